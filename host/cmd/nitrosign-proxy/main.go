// Command nitrosign-proxy runs on the parent EC2 instance: it accepts gRPC
// on TCP and forwards every call, unchanged, to the nitrosign enclave signer
// over a pool of long-lived AF_VSOCK connections.
//
// Usage:
//
//	nitrosign-proxy --upstream vsock://16:5005 [--listen 127.0.0.1:8443]
//	    [--tls-cert FILE --tls-key FILE [--client-ca FILE]] [--metrics-listen 127.0.0.1:9464]
//	    [--enclave-host-port 5051 --keyset-file FILE] [--kms-forward-port 8000 --kms-region REGION]
//	    [--enclave-audit-port 5052 --audit-file FILE]
//
// Run nitrosign-proxy -h for every flag and more examples.
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/logging"
	"github.com/nitrosign/nitrosign/internal/pprofserver"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// run is the whole binary: it returns the exit status, 0 after -h or a
// clean drain, 2 for a bad command line, 1 when start-up or shutdown fails.
// Every failure is logged at error level on stderr, in the configured log
// format, with what failed and what to do (hint).
func run(args []string, stderr io.Writer) int {
	cfg, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		// parseFlags printed the details for people; this line is for the
		// journal and log shippers, in the format asked for when it parsed.
		log := fallbackLogger(cfg.Log, stderr)
		log.Error("start-up failed: bad command line", zap.String("error", err.Error()),
			zap.String("hint", "fix the flag named above; nitrosign-proxy -h lists every flag"))
		_ = log.Sync()
		return 2
	}
	log, err := logging.New(cfg.Log, stderr)
	if err != nil { // parseFlags validated the log config
		fmt.Fprintf(stderr, "nitrosign-proxy: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	var px *proxy.Proxy
	app := fx.New(appOptions(cfg, log), fx.Populate(&px))
	// runApp blocks until SIGINT or SIGTERM, then stops gracefully (drain
	// up to --graceful-timeout).
	return runApp(app, log, cfg.GracefulStopTimeout, func(ctx context.Context) {
		// fx stops only what started: when a hook before the proxy's
		// (the metrics listener) fails, the proxy that was built is
		// stopped here (nothing of it runs before Serve; Stop is
		// idempotent).
		if px != nil {
			_ = px.Stop(ctx)
		}
	})
}

// appOptions is the application run runs: proxy.Options(cfg) logging to
// log, pprof when asked for, and the TLS certificate's expiry exported as
// nitrosign_proxy_tls_cert_expiry_seconds.
func appOptions(cfg proxy.Config, log *zap.Logger) fx.Option {
	opts := []fx.Option{
		// One logger, on stderr, for the whole graph and for run's own
		// lines (proxy.Options would build another on os.Stderr).
		fx.Replace(log),
		pprofserver.Option(pprofserver.Config{Listen: cfg.PprofListen}),
	}
	if cfg.TLS.Enabled() {
		// The proxy loads the certificate while the graph is built and
		// again on every SIGHUP; the gauge reads the last load's NotAfter.
		var notAfter atomic.Int64
		next := cfg.TLS.OnLoad
		cfg.TLS.OnLoad = func(leaf *x509.Certificate) {
			notAfter.Store(leaf.NotAfter.Unix())
			if next != nil {
				next(leaf)
			}
		}
		opts = append(opts, fx.Invoke(func(m *metrics.Metrics) {
			m.RegisterTLSCertExpiry(func() time.Time {
				if v := notAfter.Load(); v != 0 {
					return time.Unix(v, 0)
				}
				return time.Time{}
			})
		}))
	}
	return fx.Options(append([]fx.Option{proxy.Options(cfg)}, opts...)...)
}

// fallbackLogger is a logger for c when c is valid, else the default one
// (JSON at info level).
func fallbackLogger(c logging.Config, w io.Writer) *zap.Logger {
	if log, err := logging.New(c, w); err == nil {
		return log
	}
	log, _ := logging.New(logging.Config{}, w)
	return log
}

// runApp starts app, waits for SIGINT/SIGTERM, and stops it within the
// graceful timeout plus a margin. It returns the exit status: 0 after a
// clean drain, 1 when start-up or shutdown failed. fx logs its own errors
// at debug level only (logging.FxLogger): each failure is logged here, once,
// at error level, with its root cause and a hint. afterFailedStart, when
// not nil, releases what construction started once app.Start failed.
func runApp(app *fx.App, log *zap.Logger, graceful time.Duration, afterFailedStart func(context.Context)) int {
	if err := app.Err(); err != nil {
		logStartFailure(log, err)
		return 1
	}
	startCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := app.Start(startCtx); err != nil {
		logStartFailure(log, err)
		if afterFailedStart != nil {
			stopCtx, cancelStop := context.WithTimeout(context.Background(), graceful)
			defer cancelStop()
			afterFailedStart(stopCtx)
		}
		return 1
	}
	sig := <-app.Wait()
	log.Info("stopping", zap.String("signal", sig.Signal.String()))
	stopCtx, cancelStop := context.WithTimeout(context.Background(), graceful+10*time.Second)
	defer cancelStop()
	if err := app.Stop(stopCtx); err != nil {
		log.Error("shutdown failed", zap.Error(err),
			zap.String("hint", "calls in flight may have been cut; raise --graceful-timeout if they need longer"))
		return 1
	}
	log.Info("stopped")
	return sig.ExitCode
}

func logStartFailure(log *zap.Logger, err error) {
	cause := logging.RootCause(err)
	log.Error("start-up failed", zap.String("error", cause.Error()), zap.String("hint", startHint(cause)))
}

// startHint says what to do about a start-up error.
func startHint(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "keyset directory"):
		return "the directory of --keyset-file must exist and be writable by the proxy: the unit's StateDirectory=nitrosign makes /var/lib/nitrosign"
	case strings.Contains(msg, "audit file"):
		return "the directory of --audit-file must exist and the proxy must be able to append to the file: the unit's StateDirectory=nitrosign makes /var/lib/nitrosign; or turn the receiver off with --enclave-audit-port 0"
	case strings.Contains(msg, "vsock port") && errors.Is(err, syscall.EADDRINUSE):
		return "another process already listens on that vsock port: stop it, or choose another --enclave-log-port, --enclave-host-port, --kms-forward-port or --enclave-audit-port (0 turns one off)"
	case strings.Contains(msg, "vsock port"):
		return "this machine cannot listen on vsock (is /dev/vsock there? modprobe vsock_loopback on a development machine): or turn the service off with --enclave-log-port, --enclave-host-port, --kms-forward-port or --enclave-audit-port 0"
	case strings.Contains(msg, "AWS credentials") || strings.Contains(msg, "AWS configuration"):
		return "the AWS configuration files (AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE, ~/.aws) could not be read: fix or remove them; on EC2 the instance role needs none"
	case errors.Is(err, syscall.EADDRINUSE):
		return "another process already listens on that address (see: ss -ltnp): stop it, or choose another --listen, --metrics-listen or --pprof-listen"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return "no interface of this machine has that IP address: fix --listen, --metrics-listen or --pprof-listen"
	case errors.Is(err, syscall.EACCES) && strings.Contains(msg, "listen"):
		return "ports below 1024 need CAP_NET_BIND_SERVICE: choose a port >= 1024 or grant the capability"
	case strings.Contains(msg, "client CA"):
		return "--client-ca must be a readable PEM file holding the CA certificate(s) that sign client certificates"
	case errors.Is(err, fs.ErrNotExist):
		return "a file named by --tls-cert, --tls-key or --client-ca does not exist: fix the path"
	case errors.Is(err, fs.ErrPermission):
		return "the proxy's user cannot read a file named by --tls-cert, --tls-key or --client-ca: fix its owner or mode"
	case strings.Contains(msg, "private key does not match public key"):
		return "--tls-key is not the private key of --tls-cert's certificate: give the key the certificate was issued for"
	case strings.Contains(msg, "TLS certificate") || strings.Contains(msg, "tls:") || strings.Contains(msg, "x509"):
		return "--tls-cert must be a PEM certificate chain (leaf first) and --tls-key its PEM private key: check both files (openssl x509 -in FILE -noout -text)"
	case strings.Contains(msg, "upstream"):
		return "check --upstream (vsock://CID:PORT or tcp://HOST:PORT) and that the machine has vsock (/dev/vsock)"
	default:
		return "fix the cause above and start again; --log-level debug traces every start-up step"
	}
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

The TCP port serves plaintext only on loopback. On any other address give a
certificate (--tls-cert, --tls-key) and, to admit only clients with a
certificate from your CA, --client-ca (mutual TLS); or --insecure to serve
plaintext anyway. SIGHUP re-reads the certificate, key and client CA without
dropping connections ('systemctl reload nitrosign-proxy').

--metrics-listen serves Prometheus metrics (plain HTTP, GET /metrics): the
proxy's calls, latencies, pool connections and redials, Go and process
metrics, and the enclave's own counters, fetched over vsock at each scrape.

Under systemd (Type=notify) the proxy sends READY=1 once a connection to the
enclave is ready, and pings the watchdog when WatchdogSec= is set.

Sealed keys (nitrosign-enclave --key-mode sealed, docs/SEALING.md): the proxy
serves its enclaves, over vsock, the host service (--enclave-host-port): the
sealed keyset, kept in --keyset-file (the host never sees a key in clear), and
this instance's AWS credentials for KMS (the instance role, through IMDSv2;
never logged); and relays their KMS connections to the region's KMS endpoint
(--kms-forward-port, --kms-region or --kms-endpoint). A new keyset is made
only after 'nitrosign keyset init'; 'nitrosign keyset show' prints the file's
header.

Audit trail (docs: nitrosign audit verify -h): enclaves ship every signing
decision, allowed or denied, in a hash-chained log whose heads they sign with
an attested key; the proxy receives it on --enclave-audit-port, checks each
entry's hash and links, and appends it to --audit-file (only ever appended
to, fsynced before it acknowledges). 'nitrosign audit verify' checks the
file: chains, hashes, signed heads, attestations, and any gap or edit.

Examples:
  # Enclave started with: nitro-cli run-enclave --enclave-cid 16 ...
  nitrosign-proxy --upstream vsock://16:5005

  # Sealed keys: host service and KMS forwarder for enclaves (as the unit)
  nitrosign-proxy --upstream vsock://16:5005 --enclave-host-port 5051 \
    --keyset-file /var/lib/nitrosign/keyset.sealed --kms-forward-port 8000 --kms-region eu-west-1

  # The audit trail of signing decisions (as the unit), also in the journal
  nitrosign-proxy --upstream vsock://16:5005 --enclave-audit-port 5052 \
    --audit-file /var/lib/nitrosign/audit.jsonl --audit-log-decisions

  # Development against a signer on vsock loopback, readable debug logs
  nitrosign-proxy --upstream vsock://1:5005 --log-level debug --log-format console

  # VPC clients with mutual TLS, metrics for a local Prometheus
  nitrosign-proxy --upstream vsock://16:5005 --listen 0.0.0.0:8443 \
    --tls-cert /etc/nitrosign/tls/server.pem --tls-key /etc/nitrosign/tls/server-key.pem \
    --client-ca /etc/nitrosign/tls/clients-ca.pem --metrics-listen 127.0.0.1:9464

  # Through the proxy
  grpc-health-probe -addr 127.0.0.1:8443
  grpc-health-probe -addr 127.0.0.1:8443 -service nitrosign.v1.SignerService
  grpcurl -plaintext 127.0.0.1:8443 list

Flags:
`

// vsockPort parses a vsock port flag into dst.
func vsockPort(dst *uint32) func(string) error {
	return func(s string) error {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return errors.New("want a vsock port number")
		}
		*dst = uint32(v)
		return nil
	}
}

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
	upstreamGiven := false
	fs.Func("upstream", fmt.Sprintf("enclave signer `address`: vsock://CID:PORT (CID >= 4; 1 = loopback) or tcp://HOST:PORT; repeat it for several enclaves serving the same keyset (default %s)", cfg.Upstreams[0]), func(s string) error {
		if !upstreamGiven {
			cfg.Upstreams, upstreamGiven = nil, true
		}
		cfg.Upstreams = append(cfg.Upstreams, s)
		return nil
	})
	fs.IntVar(&cfg.Pool.Size, "pool-size", cfg.Pool.Size, "upstream connections (slots) per --upstream, each carrying calls and watching the enclave's health (1-256)")
	fs.DurationVar(&cfg.GracefulStopTimeout, "graceful-timeout", cfg.GracefulStopTimeout, "on SIGTERM/SIGINT, how long calls in flight may finish before they are cut")
	fs.StringVar(&cfg.Log.Level, "log-level", cfg.Log.Level, "log `level`: debug (logs every call), info, warn or error")
	fs.StringVar(&cfg.Log.Format, "log-format", cfg.Log.Format, "log `format`: json or console")
	fs.StringVar(&cfg.TLS.CertFile, "tls-cert", cfg.TLS.CertFile, "TLS certificate chain PEM `file` for the gRPC port (re-read on SIGHUP)")
	fs.StringVar(&cfg.TLS.KeyFile, "tls-key", cfg.TLS.KeyFile, "TLS private key PEM `file` (with --tls-cert)")
	fs.StringVar(&cfg.TLS.ClientCAFile, "client-ca", cfg.TLS.ClientCAFile, "PEM `file` of the CA(s) client certificates must chain to: mutual TLS (with --tls-cert)")
	fs.BoolVar(&cfg.Insecure, "insecure", cfg.Insecure, "allow plaintext on a non-loopback --listen address (anyone who reaches it can sign)")
	fs.StringVar(&cfg.PprofListen, "pprof-listen", cfg.PprofListen, "serve Go profiles (/debug/pprof/) on this loopback `HOST:PORT`, for profiling; off when empty")
	fs.Func("enclave-log-port", "receive the log lines enclaves ship (nitrosign-enclave --log-ship) on this vsock `port` (any CID) and write them to this log, with the enclave's fields; 0: off (default 0; deploy/nitrosign-proxy.service sets 5050)", vsockPort(&cfg.EnclaveLogPort))
	// Sealed keys (nitrosign-enclave --key-mode sealed, docs/SEALING.md).
	fs.Func("enclave-host-port", "serve enclaves the host service on this vsock `port` (any CID): the sealed keyset kept in --keyset-file, and this instance's AWS credentials (instance role, through IMDSv2) for their KMS calls; 0: off, and no credentials are loaded (default 0; deploy/nitrosign-proxy.service sets 5051)", vsockPort(&cfg.EnclaveHostPort))
	fs.StringVar(&cfg.KeysetFile, "keyset-file", cfg.KeysetFile, "the sealed keyset `file` the host service keeps, absolute path; FILE.prev (the one it replaced) and FILE.init (nitrosign keyset init) go beside it")
	fs.Func("kms-forward-port", "relay enclaves' connections to AWS KMS from this vsock `port` (any CID) to --kms-region's KMS endpoint, or --kms-endpoint, and nowhere else (TLS end to end); 0: off (default 0; deploy/nitrosign-proxy.service sets 8000)", vsockPort(&cfg.KMSForwardPort))
	fs.StringVar(&cfg.KMSRegion, "kms-region", cfg.KMSRegion, "AWS `region` of the enclave's KMS key, e.g. eu-west-1: the KMS forwarder relays to kms.REGION.amazonaws.com:443")
	fs.StringVar(&cfg.KMSEndpoint, "kms-endpoint", cfg.KMSEndpoint, "the KMS forwarder relays to this `HOST:PORT` instead of --kms-region's endpoint (a FIPS or VPC endpoint, a test KMS)")
	// The audit trail of signing decisions (enclave/audit, host/auditlog).
	fs.Func("enclave-audit-port", "receive the audit trail of signing decisions enclaves ship on this vsock `port` (any CID) and append it to --audit-file; 0: off (default 0; deploy/nitrosign-proxy.service sets 5052)", vsockPort(&cfg.EnclaveAuditPort))
	fs.StringVar(&cfg.AuditFile, "audit-file", cfg.AuditFile, "the audit `file` the receiver appends to (absolute path, its directory must exist; created 0600); check it with nitrosign audit verify")
	fs.BoolVar(&cfg.AuditLogDecisions, "audit-log-decisions", cfg.AuditLogDecisions, "also log every stored audit decision, and each signed head, at info (fields only: the message's SHA-256, never the message)")
	fs.StringVar(&cfg.Metrics.Listen, "metrics-listen", cfg.Metrics.Listen, "serve Prometheus metrics on `HOST:PORT` (plain HTTP, /metrics); off when empty")
	// Limits (docs/RELIABILITY.md): those both servers share, then the
	// relay's own.
	cfg.Limits.RegisterFlags(fs, "client connection")
	fs.BoolVar(&cfg.AllowKeyAdmin, "allow-key-admin", false, "forward nitrosign.v1.KeyAdminService (key rotation) from this proxy's clients; default: PermissionDenied, and the operator rotates from the parent over vsock (nitrosign keys create --target vsock://CID:5005)")
	fs.DurationVar(&cfg.DefaultStreamTimeout, "default-stream-timeout", cfg.DefaultStreamTimeout, "deadline given to a streaming or unknown call that arrives without one (0: none)")
	fs.IntVar(&cfg.MaxConnectionCalls, "max-connection-calls", cfg.MaxConnectionCalls, "calls one client connection may have open at the enclave at once (its share); beyond it RESOURCE_EXHAUSTED")
	fs.IntVar(&cfg.MaxClientResets, "max-client-resets", cfg.MaxClientResets, "streams a client connection may reset at once (a tenth earned back per second); beyond it GOAWAY ENHANCE_YOUR_CALM")
	fs.IntVar(&cfg.MaxConnectionBuffer, "max-connection-buffer", cfg.MaxConnectionBuffer, "`bytes` one client connection may have queued before the proxy stops reading from it")
	fs.Int64Var(&cfg.MemoryBudget, "memory-budget", cfg.MemoryBudget, "`bytes` the relay may buffer across all connections; over it new calls get RESOURCE_EXHAUSTED")
	fs.IntVar(&cfg.MaxSendMsgSize, "max-send-msg-size", cfg.MaxSendMsgSize, "largest response message from the enclave, in `bytes`")
	if err := fs.Parse(args); err != nil {
		return proxy.Config{Log: cfg.Log}, err // flag already printed it, with the usage
	}
	if fs.NArg() > 0 {
		err := fmt.Errorf("unexpected argument %q: every setting is a flag", fs.Arg(0))
		fmt.Fprintf(stderr, "nitrosign-proxy: %v (see nitrosign-proxy -h)\n", err)
		return proxy.Config{Log: cfg.Log}, err
	}
	err := cfg.Validate()
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if given["kms-region"] && cfg.KMSRegion == "" && cfg.KMSEndpoint == "" && cfg.KMSForwardPort != 0 {
		// The unit passes --kms-region ${NITROSIGN_KMS_REGION}.
		err = errors.Join(err, errors.New("--kms-region is empty: under systemd, set NITROSIGN_KMS_REGION in /etc/nitrosign/proxy.env (deploy/proxy.env) to the region of the enclave's KMS key"))
	}
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			fmt.Fprintf(stderr, "nitrosign-proxy: %s\n", line)
		}
		fmt.Fprintln(stderr, "see nitrosign-proxy -h")
		return proxy.Config{Log: cfg.Log}, err
	}
	return cfg, nil
}
