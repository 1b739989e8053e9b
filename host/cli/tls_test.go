package cli

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/tlsconfig"
	"github.com/nitrosign/nitrosign/internal/tlsconfig/tlstest"
)

// startTLSProxy runs a proxy with mutual TLS in front of a real enclave and
// returns its tcp:// target.
func startTLSProxy(t *testing.T, tc tlsconfig.ServerConfig) string {
	t.Helper()
	e := enclavetest.Start(t, enclavetest.DefaultConfig(), 0)
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{e.Target}
	cfg.Listen = "127.0.0.1:0"
	cfg.Pool.Size = 1
	cfg.TLS = tc
	log := zaptest.NewLogger(t)
	pl, err := proxy.NewUpstreams(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	px, err := proxy.New(cfg, pl, log)
	if err != nil {
		_ = pl.Close()
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- px.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = px.Stop(ctx)
		<-served
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := pl.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return "tcp://" + l.Addr().String()
}

func TestCLIMutualTLS(t *testing.T) {
	ca := tlstest.NewCA(t, "proxy-ca")
	srv := ca.Server(t, "proxy")
	clients := tlstest.NewCA(t, "clients-ca")
	good := clients.Client(t, "cli")
	rogue := tlstest.NewCA(t, "rogue").Client(t, "rogue")
	tg := "--target=" + startTLSProxy(t, tlsconfig.ServerConfig{CertFile: srv.CertFile, KeyFile: srv.KeyFile, ClientCAFile: clients.File})

	r := mustOK(t, run(t, "", "echo", tg, "--payload", "hi", "--tls-ca", ca.File, "--tls-cert", good.CertFile, "--tls-key", good.KeyFile))
	if !strings.Contains(r.stdout, "echo 2 bytes") {
		t.Fatalf("echo output %q", r.stdout)
	}
	other := tlstest.NewCA(t, "other-ca")
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  []string
	}{
		{"no client certificate", []string{"--tls-ca", ca.File}, ExitFailure,
			[]string{"TLS handshake with", "certificate required", "give --tls-cert FILE --tls-key FILE"}},
		{"client certificate from another CA", []string{"--tls-ca", ca.File, "--tls-cert", rogue.CertFile, "--tls-key", rogue.KeyFile}, ExitFailure,
			[]string{"TLS handshake with", "issued by its --client-ca"}},
		{"plaintext", nil, ExitFailure, []string{"speaks TLS", "add --tls"}},
		{"server not trusted (system roots)", []string{"--tls", "--tls-cert", good.CertFile, "--tls-key", good.KeyFile}, ExitFailure,
			[]string{"TLS handshake with", "certificate signed by unknown authority", "give its CA with --tls-ca"}},
		{"wrong CA", []string{"--tls-ca", other.File, "--tls-cert", good.CertFile, "--tls-key", good.KeyFile}, ExitFailure,
			[]string{"TLS handshake with", "unknown authority", "--tls-ca"}},
		{"wrong server name", []string{"--tls-ca", ca.File, "--tls-server-name", "signer.example.com", "--tls-cert", good.CertFile, "--tls-key", good.KeyFile}, ExitFailure,
			[]string{"TLS handshake with", "signer.example.com", "--tls-server-name NAME"}},
		{"cert without key", []string{"--tls-cert", good.CertFile}, ExitUsage, []string{"give both or neither"}},
		{"missing CA file", []string{"--tls-ca", "/nonexistent/ca.pem"}, ExitFailure, []string{"/nonexistent/ca.pem"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A mismatch is reported at once, not after --timeout.
			args := append([]string{"echo", tg, "--timeout", "20s"}, tt.args...)
			start := time.Now()
			r := run(t, "", args...)
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %v: a TLS mismatch must be reported well before --timeout", d)
			}
			if r.code != tt.wantCode {
				t.Fatalf("exit %d, stderr %q; want exit %d", r.code, r.stderr, tt.wantCode)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr %q, want %q", r.stderr, w)
				}
			}
			if strings.Contains(r.stderr, "is the host proxy running?") {
				t.Errorf("stderr %q blames a proxy that is running", r.stderr)
			}
		})
	}
}

// --tls against a plaintext proxy says so at once; plaintext still works
// without delay.
func TestCLITLSToPlaintextProxy(t *testing.T) {
	tg := "--target=" + startTLSProxy(t, tlsconfig.ServerConfig{})
	start := time.Now()
	mustOK(t, run(t, "", "echo", tg, "--payload", "hi", "--timeout", "20s"))
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("plaintext echo took %v: the pre-check must not delay a good connection", d)
	}
	start = time.Now()
	r := run(t, "", "echo", tg, "--tls", "--timeout", "20s")
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v: want the mismatch reported at once", d)
	}
	if r.code != ExitFailure || !strings.Contains(r.stderr, "TLS handshake with") || !strings.Contains(r.stderr, "does not speak TLS: drop --tls") {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestCLITLSToVsockRefused(t *testing.T) {
	r := run(t, "", "echo", "--target", "vsock://16:5005", "--tls")
	if r.code != ExitUsage || !strings.Contains(r.stderr, "vsock port is plaintext") {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
}
