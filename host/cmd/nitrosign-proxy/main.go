// Command nitrosign-proxy runs on the parent EC2 instance: it accepts gRPC
// on TCP and forwards every call, unchanged, to the nitrosign enclave signer
// over a pool of long-lived AF_VSOCK connections.
//
// Usage:
//
//	nitrosign-proxy --upstream vsock://16:5005 [--listen 127.0.0.1:8443]
//
// Run nitrosign-proxy -h for every flag and more examples.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"go.uber.org/fx"

	"github.com/nitrosign/nitrosign/host/proxy"
)

func main() {
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		os.Exit(2)
	}
	// Run blocks until SIGINT or SIGTERM, then stops gracefully (drain up
	// to --graceful-timeout); it exits 1 itself if start-up fails.
	fx.New(proxy.Options(cfg)).Run()
}

const usage = `Usage: nitrosign-proxy [flags]

nitrosign-proxy accepts gRPC on TCP and forwards every call (any method, with
its metadata, deadline, status and trailers; message bytes untouched) to the
nitrosign enclave signer over a pool of long-lived AF_VSOCK connections. It
reconnects by itself when the enclave restarts. While no connection is ready,
calls fail at once with UNAVAILABLE and the proxy's own health (service "")
is NOT_SERVING; health checks of any other service name, and reflection, are
answered by the enclave.

The enclave's CID is the --enclave-cid given to 'nitro-cli run-enclave' (see
'nitro-cli describe-enclaves'); it is always >= 4. CID 1 is local loopback,
for development. The signer's vsock port defaults to 5005.

The TCP port has no TLS or authentication yet: keep it on loopback.

Examples:
  # Enclave started with: nitro-cli run-enclave --enclave-cid 16 ...
  nitrosign-proxy --upstream vsock://16:5005

  # Development against a signer on vsock loopback, readable debug logs
  nitrosign-proxy --upstream vsock://1:5005 --log-level debug --log-format console

  # Through the proxy
  grpc-health-probe -addr 127.0.0.1:8443
  grpc-health-probe -addr 127.0.0.1:8443 -service nitrosign.v1.SignerService
  grpcurl -plaintext 127.0.0.1:8443 list

Flags:
`

// parseFlags turns the command line into a validated Config. On -h it
// prints the usage and returns flag.ErrHelp; on a bad flag it prints a
// precise error and returns it.
func parseFlags(args []string, stderr io.Writer) (proxy.Config, error) {
	cfg := proxy.DefaultConfig()
	fs := flag.NewFlagSet("nitrosign-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.Listen, "listen", cfg.Listen, "TCP `HOST:PORT` to serve gRPC on")
	fs.StringVar(&cfg.Upstream, "upstream", cfg.Upstream, "enclave signer `address`: vsock://CID:PORT (CID >= 4; 1 = loopback) or tcp://HOST:PORT")
	fs.IntVar(&cfg.Pool.Size, "pool-size", cfg.Pool.Size, "number of long-lived connections to the enclave (1-256)")
	fs.DurationVar(&cfg.GracefulStopTimeout, "graceful-timeout", cfg.GracefulStopTimeout, "on SIGTERM/SIGINT, how long calls in flight may finish before they are cut")
	fs.StringVar(&cfg.Log.Level, "log-level", cfg.Log.Level, "log `level`: debug (logs every call), info, warn or error")
	fs.StringVar(&cfg.Log.Format, "log-format", cfg.Log.Format, "log `format`: json or console")
	if err := fs.Parse(args); err != nil {
		return proxy.Config{}, err // flag already printed it, with the usage
	}
	if fs.NArg() > 0 {
		err := fmt.Errorf("unexpected argument %q: every setting is a flag", fs.Arg(0))
		fmt.Fprintf(stderr, "nitrosign-proxy: %v (see nitrosign-proxy -h)\n", err)
		return proxy.Config{}, err
	}
	if err := cfg.Validate(); err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			fmt.Fprintf(stderr, "nitrosign-proxy: %s\n", line)
		}
		fmt.Fprintln(stderr, "see nitrosign-proxy -h")
		return proxy.Config{}, err
	}
	return cfg, nil
}
