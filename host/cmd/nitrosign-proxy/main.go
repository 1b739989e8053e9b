// Command nitrosign-proxy runs on the parent EC2 instance: it accepts gRPC
// on TCP and forwards every call, unchanged, to the nitrosign enclave signer
// over a pool of long-lived AF_VSOCK connections.
//
// Usage:
//
//	nitrosign-proxy --upstream vsock://16:5005 [--listen 127.0.0.1:8443]
//	    [--tls-cert FILE --tls-key FILE [--client-ca FILE]] [--metrics-listen 127.0.0.1:9464]
//
// Run nitrosign-proxy -h for every flag and more examples.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"go.uber.org/fx"

	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/pprofserver"
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
	fx.New(proxy.Options(cfg), pprofserver.Option(pprofserver.Config{Listen: cfg.PprofListen})).Run()
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

Examples:
  # Enclave started with: nitro-cli run-enclave --enclave-cid 16 ...
  nitrosign-proxy --upstream vsock://16:5005

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
	fs.StringVar(&cfg.Metrics.Listen, "metrics-listen", cfg.Metrics.Listen, "serve Prometheus metrics on `HOST:PORT` (plain HTTP, /metrics); off when empty")
	// Limits (docs/RELIABILITY.md).
	fs.IntVar(&cfg.MaxConnections, "max-connections", cfg.MaxConnections, "client connections open at once; more are closed at once (logged, nitrosign_proxy_shed_total)")
	fs.IntVar(&cfg.MaxInFlight, "max-in-flight", cfg.MaxInFlight, "calls served at once (health exempt); beyond it RESOURCE_EXHAUSTED at once")
	fs.DurationVar(&cfg.DefaultCallTimeout, "default-timeout", cfg.DefaultCallTimeout, "deadline given to a unary call that arrives without one (sent on upstream)")
	fs.DurationVar(&cfg.DefaultStreamTimeout, "default-stream-timeout", cfg.DefaultStreamTimeout, "deadline given to a streaming or unknown call that arrives without one (0: none)")
	fs.IntVar(&cfg.MaxConnectionCalls, "max-connection-calls", cfg.MaxConnectionCalls, "calls one client connection may have open at the enclave at once (its share); beyond it RESOURCE_EXHAUSTED")
	fs.IntVar(&cfg.MaxClientResets, "max-client-resets", cfg.MaxClientResets, "streams a client connection may reset at once (a tenth earned back per second); beyond it GOAWAY ENHANCE_YOUR_CALM")
	fs.IntVar(&cfg.MaxConnectionBuffer, "max-connection-buffer", cfg.MaxConnectionBuffer, "`bytes` one client connection may have queued before the proxy stops reading from it")
	fs.Int64Var(&cfg.MemoryBudget, "memory-budget", cfg.MemoryBudget, "`bytes` the relay may buffer across all connections; over it new calls get RESOURCE_EXHAUSTED")
	fs.Func("max-concurrent-streams", fmt.Sprintf("calls open at once on one client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS) (default %d)", cfg.MaxConcurrentStreams), uint32Flag(&cfg.MaxConcurrentStreams))
	fs.Func("max-header-list-size", fmt.Sprintf("largest request header block, in `bytes` (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE) (default %d)", cfg.MaxHeaderListSize), uint32Flag(&cfg.MaxHeaderListSize))
	fs.IntVar(&cfg.MaxMetadataSize, "max-metadata-size", cfg.MaxMetadataSize, "largest request metadata, in `bytes` (names + values + 32 per entry); beyond it RESOURCE_EXHAUSTED")
	fs.IntVar(&cfg.MaxRecvMsgSize, "max-recv-msg-size", cfg.MaxRecvMsgSize, "largest request message from a client, in `bytes`")
	fs.IntVar(&cfg.MaxSendMsgSize, "max-send-msg-size", cfg.MaxSendMsgSize, "largest response message from the enclave, in `bytes`")
	fs.DurationVar(&cfg.HandshakeTimeout, "handshake-timeout", cfg.HandshakeTimeout, "how long a new client connection may take for TLS and the HTTP/2 preface")
	fs.DurationVar(&cfg.KeepaliveMinTime, "keepalive-min-time", cfg.KeepaliveMinTime, "shortest interval between client pings tolerated (more often: GOAWAY too_many_pings)")
	fs.DurationVar(&cfg.KeepaliveTime, "keepalive-time", cfg.KeepaliveTime, "ping a client connection silent this long")
	fs.DurationVar(&cfg.KeepaliveTimeout, "keepalive-timeout", cfg.KeepaliveTimeout, "close a client connection whose ping is unanswered this long")
	fs.DurationVar(&cfg.MaxConnectionIdle, "max-connection-idle", cfg.MaxConnectionIdle, "close a client connection without calls for this long (0: never)")
	fs.DurationVar(&cfg.MaxConnectionAge, "max-connection-age", cfg.MaxConnectionAge, "close a client connection this old, so clients re-handshake (0: never)")
	fs.DurationVar(&cfg.MaxConnectionAgeGrace, "max-connection-age-grace", cfg.MaxConnectionAgeGrace, "let calls on an aged-out connection finish for this long (0: as long as they take)")
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

// uint32Flag parses a flag into a uint32 field.
func uint32Flag(dst *uint32) func(string) error {
	return func(s string) error {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return fmt.Errorf("want a number 0-4294967295")
		}
		*dst = uint32(v)
		return nil
	}
}
