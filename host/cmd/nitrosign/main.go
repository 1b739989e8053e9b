// Command nitrosign is the client of the nitrosign enclave signing service:
// the commands of package host/cli (echo, keys, pubkey, sign, verify,
// attest, bench, compare) against the enclave directly (vsock://CID:PORT)
// or through the host proxy (tcp://HOST:PORT).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/nitrosign/nitrosign/host/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Run(ctx, cli.IO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}, os.Args[1:])
	stop()
	os.Exit(code)
}
