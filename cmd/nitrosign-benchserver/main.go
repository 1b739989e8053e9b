// Command nitrosign-benchserver is the benchmark harness: it runs the real
// enclave graph (signer, attestation with the simulated NSM, gRPC server) or
// the real host proxy on a TCP loopback listener, so that the system can be
// measured on machines without vsock, and it measures the in-process signing
// rate that the signing figures are compared against.
//
// It is never shipped: the enclave binary (enclave/cmd/nitrosign-enclave)
// listens on AF_VSOCK only, and neither `make build` nor the enclave image
// builds this command. It listens on loopback addresses only.
//
// Usage:
//
//	nitrosign-benchserver enclave --listen 127.0.0.1:7001 [--pprof-listen 127.0.0.1:6061]
//	nitrosign-benchserver proxy --listen 127.0.0.1:7002 --upstream tcp://127.0.0.1:7001
//	nitrosign-benchserver sign-baseline --key-type ecc --target stack=tcp://127.0.0.1:7002
//	nitrosign-benchserver l4relay --listen 127.0.0.1:7004 --upstream 127.0.0.1:7001
//	nitrosign-benchserver h2spec-compare --baseline grpc-go=a.xml --target proxy=b.xml
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/logging"
	"github.com/nitrosign/nitrosign/internal/pprofserver"
)

const usage = `nitrosign-benchserver: benchmark harness (never shipped; loopback only).

Usage:
  nitrosign-benchserver enclave [flags]        the real enclave graph on TCP loopback
  nitrosign-benchserver proxy [flags]          the real host proxy (same as nitrosign-proxy)
  nitrosign-benchserver sign-baseline [flags]  in-process signing rate, compared with targets
  nitrosign-benchserver tcp-echo [flags]       raw TCP echo: the floor of one process hop
  nitrosign-benchserver tcp-pingpong [flags]   round trips to tcp-echo, one at a time
  nitrosign-benchserver l4relay [flags]        plain io.Copy TCP relay: the baseline of a proxy
  nitrosign-benchserver h2spec-compare [flags] two h2spec JUnit reports side by side

"nitrosign-benchserver <command> -h" shows its flags and examples.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// errUsage marks a command-line mistake (exit 2); it has been reported.
var errUsage = errors.New("usage")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	var err error
	switch args[0] {
	case "enclave":
		err = runEnclave(args[1:], stderr)
	case "proxy":
		err = runProxy(args[1:], stderr)
	case "sign-baseline":
		err = runBaseline(ctx, args[1:], stdout, stderr)
	case "tcp-echo":
		err = runTCPEcho(ctx, args[1:], stderr)
	case "tcp-pingpong":
		err = runTCPPingPong(args[1:], stdout, stderr)
	case "l4relay":
		err = runL4Relay(ctx, args[1:], stderr)
	case "h2spec-compare":
		err = runH2specCompare(args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "nitrosign-benchserver: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "nitrosign-benchserver %s: %v\n", args[0], err)
		return 1
	}
}

// parse parses args and reports mistakes with a pointer to -h.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage // flag printed it
	}
	if fs.NArg() > 0 {
		return usageErr(stderr, fs.Name(), "unexpected argument %q (flags only; see -h)", fs.Arg(0))
	}
	return nil
}

func usageErr(stderr io.Writer, cmd, format string, a ...any) error {
	fmt.Fprintf(stderr, "%s: %s\n", cmd, fmt.Sprintf(format, a...))
	return errUsage
}

func newFlagSet(name, text string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("nitrosign-benchserver "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, text)
		fmt.Fprintln(stderr, "\nFlags:")
		fs.PrintDefaults()
	}
	return fs
}

// loopbackListen checks that addr is a loopback HOST:PORT: this harness
// has no business on a network.
func loopbackListen(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen address %q: want HOST:PORT", addr)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("listen address %q: the benchmark harness listens on loopback only (127.0.0.1)", addr)
	}
	return nil
}

const enclaveUsage = `Usage: nitrosign-benchserver enclave [flags]

Runs the real enclave graph (enclave.Options: signer, attestation with the
simulated NSM, gRPC server with the production options) on a TCP loopback
listener, until SIGINT or SIGTERM. The keys are generated at start-up as in
the enclave.

Examples:
  nitrosign-benchserver enclave --listen 127.0.0.1:7001
  nitrosign-benchserver enclave --listen 127.0.0.1:7001 --pprof-listen 127.0.0.1:6061
  go tool pprof -seconds 10 http://127.0.0.1:6061/debug/pprof/profile
`

func runEnclave(args []string, stderr io.Writer) error {
	fs := newFlagSet("enclave", enclaveUsage, stderr)
	c := enclave.DefaultConfig()
	listen := fs.String("listen", "127.0.0.1:7001", "loopback TCP `HOST:PORT` to serve gRPC on")
	pp := fs.String("pprof-listen", "", "serve /debug/pprof/ on this loopback `HOST:PORT` (off by default)")
	fs.IntVar(&c.Signer.RSABits, "rsa-bits", 2048, "RSA key size: 2048, 3072 or 4096")
	fs.StringVar(&c.Signer.ECCCurve, "ecc-curve", "P-256", "ECC curve: P-256 or P-384")
	fs.BoolVar(&c.Signer.Ed25519, "ed25519", true, "also generate an Ed25519 key")
	fs.StringVar(&c.Authz.PolicyFile, "policy", "", "a caller policy `file` (docs/AUTHZ.md): signed calls are checked against it (unsigned ones are still allowed), to measure what authentication costs")
	fs.StringVar(&c.Log.Level, "log-level", "warn", "log level: debug, info, warn or error")
	fs.StringVar(&c.Log.Format, "log-format", "console", "log format: json or console")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	c.Attest.DevSimulatedNSM = true // the listener part (vsock) is unused here
	c.Authz.DevAllowAnonymous = true
	c.AuditShip = ""
	pc := pprofserver.Config{Listen: *pp}
	if err := errors.Join(loopbackListen(*listen), c.Validate(), pc.Validate()); err != nil {
		return usageErr(stderr, fs.Name(), "%s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	log, err := logging.New(c.Log, os.Stderr)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	app := fx.New(
		enclave.Options(c, log),
		fx.Supply(fx.Annotate(l, fx.As(new(net.Listener)))),
		pprofserver.Option(pc),
		fx.StopTimeout(15*time.Second),
	)
	return runApp(app, log, l)
}

const proxyUsage = `Usage: nitrosign-benchserver proxy [flags]

Runs the real host proxy (proxy.Options, exactly as nitrosign-proxy does) on
a loopback TCP port, forwarding to a TCP or vsock upstream, until SIGINT or
SIGTERM. nitrosign-proxy itself works as well (it has --pprof-listen too);
this is here so the harness can run every part of the system.

Examples:
  nitrosign-benchserver proxy --listen 127.0.0.1:7002 --upstream tcp://127.0.0.1:7001
  nitrosign-benchserver proxy --listen 127.0.0.1:7002 --upstream tcp://127.0.0.1:7001 --pool-size 2 --pprof-listen 127.0.0.1:6062
`

func runProxy(args []string, stderr io.Writer) error {
	fs := newFlagSet("proxy", proxyUsage, stderr)
	cfg := proxy.DefaultConfig()
	cfg.Listen = "127.0.0.1:7002"
	cfg.Upstreams = []string{"tcp://127.0.0.1:7001"}
	cfg.Log = logging.Config{Level: "warn", Format: "console"}
	fs.StringVar(&cfg.Listen, "listen", cfg.Listen, "loopback TCP `HOST:PORT` to serve gRPC on")
	fs.Func("upstream", "enclave signer: tcp://HOST:PORT (a benchserver enclave) or vsock://CID:PORT (default tcp://127.0.0.1:7001)", func(s string) error {
		cfg.Upstreams = []string{s}
		return nil
	})
	fs.IntVar(&cfg.Pool.Size, "pool-size", cfg.Pool.Size, "long-lived connections to the upstream")
	pp := fs.String("pprof-listen", "", "serve /debug/pprof/ on this loopback `HOST:PORT` (off by default)")
	fs.StringVar(&cfg.Log.Level, "log-level", cfg.Log.Level, "log level: debug, info, warn or error")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	pc := pprofserver.Config{Listen: *pp}
	if err := errors.Join(loopbackListen(cfg.Listen), cfg.Validate(), pc.Validate()); err != nil {
		return usageErr(stderr, fs.Name(), "%s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	app := fx.New(proxy.Options(cfg), pprofserver.Option(pc))
	return runApp(app, nil, nil)
}

// runApp starts app, waits for a signal and stops it. l, when given, is
// closed if start-up fails.
func runApp(app *fx.App, log *zap.Logger, l net.Listener) error {
	if err := app.Err(); err != nil {
		if l != nil {
			_ = l.Close()
		}
		return fmt.Errorf("start-up: %w", logging.RootCause(err))
	}
	startCtx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := app.Start(startCtx); err != nil {
		if l != nil {
			_ = l.Close()
		}
		return fmt.Errorf("start-up: %w", logging.RootCause(err))
	}
	if log != nil {
		log.Warn("benchmark harness serving (development only: TCP, simulated NSM)")
	}
	<-app.Wait()
	stopCtx, cancelStop := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelStop()
	return app.Stop(stopCtx)
}
