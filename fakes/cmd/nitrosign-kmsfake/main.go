// Command nitrosign-kmsfake runs the test AWS KMS (fakes/kmsfake) for the
// demo and manual trials: it never ships. It makes a development root for
// the simulated NSM (give it to nitrosign-enclave
// --dev-simulated-nsm-root), trusts documents that chain to it and carry
// the simulated PCR0, and serves KMS's wire protocol over TLS for
// kms.eu-west-1.amazonaws.com with a CA of its own (give it to
// nitrosign-enclave --kms-ca-file).
//
// It writes, into --dir: dev-root.pem, kms-ca.pem, and kms.env (the
// address, the key ARN, and the credentials it accepts, as shell
// variables for nitrosign-proxy's environment), then serves until
// SIGINT or SIGTERM.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/fakes/devroot"
	"github.com/nitrosign/nitrosign/fakes/kmsfake"
)

func main() {
	dir := flag.String("dir", ".", "where to write dev-root.pem, kms-ca.pem and kms.env")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "nitrosign-kmsfake: a test AWS KMS for the demo (never for production).\n\nUsage:\n  nitrosign-kmsfake --dir DIR\n\nFlags:")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "nitrosign-kmsfake: unexpected argument %q\n", flag.Arg(0))
		os.Exit(2)
	}
	if err := run(*dir); err != nil {
		fmt.Fprintf(os.Stderr, "nitrosign-kmsfake: %v\n", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	rootPEM, err := devroot.New()
	if err != nil {
		return err
	}
	root, err := devroot.Root(rootPEM)
	if err != nil {
		return err
	}
	srv, err := kmsfake.Start(kmsfake.New(root, map[uint][]byte{0: attest.SimulatedPCRs()[0]}))
	if err != nil {
		return err
	}
	defer srv.Close()
	c := kmsfake.Credentials()
	env := fmt.Sprintf("KMS_ADDR=%s\nKMS_KEY_ARN=%s\nAWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_SESSION_TOKEN=%s\n",
		srv.Addr, kmsfake.KeyARN, c.AccessKeyID, c.SecretAccessKey, c.SessionToken)
	for name, b := range map[string][]byte{"dev-root.pem": rootPEM, "kms-ca.pem": srv.CAPEM, "kms.env": []byte(env)} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "nitrosign-kmsfake: TEST KMS on %s (key %s); wrote dev-root.pem, kms-ca.pem, kms.env to %s\n", srv.Addr, kmsfake.KeyARN, dir)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	return nil
}
