package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/internal/logging"
	"github.com/nitrosign/nitrosign/internal/tlsconfig/tlstest"
)

// Every start-up failure is logged on stderr at error level, at the default
// log level and format (JSON, info), naming the cause and what to do.
func TestRunStartupFailuresAreLogged(t *testing.T) {
	ca := tlstest.NewCA(t, "ca")
	srv := ca.Server(t, "server")
	other := tlstest.NewCA(t, "other").Server(t, "other")
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	// A refused TCP upstream: no vsock needed, nothing answers.
	base := []string{"--upstream", "tcp://127.0.0.1:1", "--listen", "127.0.0.1:0"}
	tls := func(cert, key string, more ...string) []string {
		return append(append(append([]string{}, base...), "--tls-cert", cert, "--tls-key", key), more...)
	}
	tests := []struct {
		name      string
		args      []string
		wantCode  int
		wantCause string // in the "error" field
		wantHint  string // in the "hint" field
	}{
		{"missing cert file", tls(filepath.Join(dir, "nope.pem"), srv.KeyFile), 1, "nope.pem: no such file", "does not exist: fix the path"},
		{"garbage cert", tls(garbage, srv.KeyFile), 1, "failed to find any PEM data", "must be a PEM certificate chain"},
		{"mismatched key", tls(srv.CertFile, other.KeyFile), 1, "private key does not match public key", "is not the private key of --tls-cert"},
		{"bad client CA", tls(srv.CertFile, srv.KeyFile, "--client-ca", garbage), 1, "no PEM certificate found", "--client-ca must be a readable PEM file"},
		{"missing client CA", tls(srv.CertFile, srv.KeyFile, "--client-ca", filepath.Join(dir, "ca-nope.pem")), 1, "ca-nope.pem: no such file", "--client-ca"},
		{"listen port in use", []string{"--upstream", "tcp://127.0.0.1:1", "--listen", busy.Addr().String()}, 1, "address already in use", "another process already listens"},
		{"metrics port in use", append(append([]string{}, base...), "--metrics-listen", busy.Addr().String()), 1, "address already in use", "another process already listens"},
		{"no keyset directory", append(append([]string{}, base...), "--enclave-host-port", "5051", "--keyset-file", filepath.Join(dir, "nope", "keyset.sealed")),
			1, "keyset directory", "StateDirectory=nitrosign makes /var/lib/nitrosign"},
		{"KMS region unset", append(append([]string{}, base...), "--kms-forward-port", "8000", "--kms-region", ""), 2, "has no destination", "nitrosign-proxy -h"},
		{"bad flag", []string{"--pool-size", "0"}, 2, "pool size 0", "nitrosign-proxy -h"},
		{"unknown flag", []string{"--port", "1"}, 2, "flag provided but not defined: -port", "nitrosign-proxy -h"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			start := time.Now()
			code := run(tt.args, &stderr)
			if code != tt.wantCode {
				t.Fatalf("run = %d, want %d; stderr:\n%s", code, tt.wantCode, stderr.String())
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("run took %v to fail", d)
			}
			if !hasErrorLine(t, stderr.String(), tt.wantCause, tt.wantHint) {
				t.Fatalf("stderr has no error-level line with cause %q and hint %q:\n%s", tt.wantCause, tt.wantHint, stderr.String())
			}
		})
	}
}

// The configured format is used for the failure line too.
func TestRunStartupFailureConsoleFormat(t *testing.T) {
	var stderr bytes.Buffer
	code := run([]string{"--log-format", "console", "--upstream", "tcp://127.0.0.1:1",
		"--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"}, &stderr)
	if code != 1 {
		t.Fatalf("run = %d, want 1; stderr:\n%s", code, stderr.String())
	}
	out := stderr.String()
	if !strings.Contains(out, "ERROR") || !strings.Contains(out, "start-up failed") || !strings.Contains(out, "fix the path") {
		t.Fatalf("no console error line:\n%s", out)
	}
	if strings.Contains(out, `"level":`) {
		t.Fatalf("JSON in console format:\n%s", out)
	}
}

// hasErrorLine reports whether out has a JSON log line at error level whose
// error and hint fields contain cause and hint.
func hasErrorLine(t *testing.T, out, cause, hint string) bool {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil {
			continue
		}
		e, _ := m["error"].(string)
		h, _ := m["hint"].(string)
		if m["level"] == "error" && strings.Contains(e, cause) && strings.Contains(h, hint) {
			return true
		}
	}
	return false
}

// With TLS, the app exports the served certificate's NotAfter as
// nitrosign_proxy_tls_cert_expiry_seconds, and a certificate that expires
// soon is logged at WARN level at the default log level.
func TestTLSCertExpiryExported(t *testing.T) {
	ca := tlstest.NewCA(t, "ca")
	soon := ca.ServerUntil(t, "soon", time.Now().Add(5*24*time.Hour))
	stderr := &syncBuffer{b: &bytes.Buffer{}}
	cfg, err := parseFlags([]string{"--upstream", "tcp://127.0.0.1:1", "--listen", "127.0.0.1:0",
		"--tls-cert", soon.CertFile, "--tls-key", soon.KeyFile}, stderr)
	if err != nil {
		t.Fatalf("parseFlags: %v\n%s", err, stderr.String())
	}
	log, err := logging.New(cfg.Log, stderr)
	if err != nil {
		t.Fatal(err)
	}
	var m *metrics.Metrics
	app := fx.New(appOptions(cfg, log), fx.Populate(&m))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := app.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer func() {
		if err := app.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	}()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var got float64
	found := false
	for _, f := range families {
		if f.GetName() == "nitrosign_proxy_tls_cert_expiry_seconds" {
			got, found = f.GetMetric()[0].GetGauge().GetValue(), true
		}
	}
	if !found || got != float64(soon.Cert.NotAfter.Unix()) {
		t.Fatalf("nitrosign_proxy_tls_cert_expiry_seconds = %v (found %v), want %d", got, found, soon.Cert.NotAfter.Unix())
	}
	out := stderr.String()
	if !strings.Contains(out, `"level":"warn"`) || !strings.Contains(out, "expires soon") {
		t.Fatalf("no WARN line for a certificate expiring in 5 days:\n%s", out)
	}
}

// Without TLS there is no certificate gauge.
func TestNoTLSNoCertExpiry(t *testing.T) {
	cfg, err := parseFlags([]string{"--upstream", "tcp://127.0.0.1:1"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	var m *metrics.Metrics
	app := fx.New(appOptions(cfg, zap.NewNop()), fx.Populate(&m))
	if err := app.Err(); err != nil {
		t.Fatal(err)
	}
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "nitrosign_proxy_tls_cert_expiry_seconds" {
			t.Fatal("certificate gauge exported without TLS")
		}
	}
	// The graph built the proxy, which runs from construction: stop it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := app.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := app.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer is a bytes.Buffer safe for the logger's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  *bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
