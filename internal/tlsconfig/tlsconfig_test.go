package tlsconfig_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/internal/tlsconfig"
	"github.com/nitrosign/nitrosign/internal/tlsconfig/tlstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestServerConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  tlsconfig.ServerConfig
		want string // "" = valid
	}{
		{"plaintext", tlsconfig.ServerConfig{}, ""},
		{"tls", tlsconfig.ServerConfig{CertFile: "c", KeyFile: "k"}, ""},
		{"mtls", tlsconfig.ServerConfig{CertFile: "c", KeyFile: "k", ClientCAFile: "ca"}, ""},
		{"cert without key", tlsconfig.ServerConfig{CertFile: "c"}, "add --tls-key"},
		{"key without cert", tlsconfig.ServerConfig{KeyFile: "k"}, "add --tls-cert"},
		{"client CA alone", tlsconfig.ServerConfig{ClientCAFile: "ca"}, "needs a server certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestNewServerErrors(t *testing.T) {
	ca := tlstest.NewCA(t, "ca")
	srv := ca.Server(t, "server")
	other := tlstest.NewCA(t, "other").Server(t, "other")
	garbage := t.TempDir() + "/garbage.pem"
	if err := os.WriteFile(garbage, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cfg  tlsconfig.ServerConfig
		want string
	}{
		{"missing cert", tlsconfig.ServerConfig{CertFile: "/nonexistent.pem", KeyFile: srv.KeyFile}, "/nonexistent.pem"},
		{"key of another cert", tlsconfig.ServerConfig{CertFile: srv.CertFile, KeyFile: other.KeyFile}, "private key does not match"},
		{"client CA not PEM", tlsconfig.ServerConfig{CertFile: srv.CertFile, KeyFile: srv.KeyFile, ClientCAFile: garbage}, "no PEM certificate"},
		{"not enabled", tlsconfig.ServerConfig{}, "no certificate configured"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tlsconfig.NewServer(tt.cfg, zaptest.NewLogger(t))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewServer = %v, want %q", err, tt.want)
			}
		})
	}
}

// serve accepts TLS connections on loopback and echoes one line per
// connection; it stops at cleanup.
func serve(t *testing.T, s *tlsconfig.Server) string {
	t.Helper()
	l, err := tls.Listen("tcp", "127.0.0.1:0", s.TLSConfig())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
	return l.Addr().String()
}

// dial makes a TLS connection and round-trips a byte (with TLS 1.3 a
// refused client certificate shows only on the first read).
func dial(t *testing.T, addr string, c tlsconfig.ClientConfig) (*tls.Conn, error) {
	t.Helper()
	tc, err := c.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, tc)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte{1}); err != nil {
		conn.Close()
		return nil, err
	}
	if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

func TestMutualTLS(t *testing.T) {
	ca := tlstest.NewCA(t, "ca")
	srvPair := ca.Server(t, "server")
	good := ca.Client(t, "good-client")
	rogueCA := tlstest.NewCA(t, "rogue")
	rogue := rogueCA.Client(t, "rogue-client")

	s, err := tlsconfig.NewServer(tlsconfig.ServerConfig{CertFile: srvPair.CertFile, KeyFile: srvPair.KeyFile, ClientCAFile: ca.File}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, s)
	tests := []struct {
		name   string
		client tlsconfig.ClientConfig
		ok     bool
	}{
		{"good client", tlsconfig.ClientConfig{CAFile: ca.File, CertFile: good.CertFile, KeyFile: good.KeyFile}, true},
		{"no client certificate", tlsconfig.ClientConfig{CAFile: ca.File}, false},
		{"client certificate from another CA", tlsconfig.ClientConfig{CAFile: ca.File, CertFile: rogue.CertFile, KeyFile: rogue.KeyFile}, false},
		{"server not trusted by client", tlsconfig.ClientConfig{CAFile: rogueCA.File, CertFile: good.CertFile, KeyFile: good.KeyFile}, false},
		{"wrong server name", tlsconfig.ClientConfig{CAFile: ca.File, CertFile: good.CertFile, KeyFile: good.KeyFile, ServerName: "elsewhere.example"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := dial(t, addr, tt.client)
			if tt.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				conn.Close()
				return
			}
			if err == nil {
				conn.Close()
				t.Fatal("accepted")
			}
		})
	}
}

func TestReload(t *testing.T) {
	ca := tlstest.NewCA(t, "ca")
	live := ca.Server(t, "live")
	renewed := ca.Server(t, "renewed")
	s, err := tlsconfig.NewServer(tlsconfig.ServerConfig{CertFile: live.CertFile, KeyFile: live.KeyFile}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, s)
	client := tlsconfig.ClientConfig{CAFile: ca.File}
	served := func() *tls.Conn {
		t.Helper()
		c, err := dial(t, addr, client)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		return c
	}
	before := served()
	defer before.Close()
	if got := before.ConnectionState().PeerCertificates[0].SerialNumber; got.Cmp(live.Cert.SerialNumber) != 0 {
		t.Fatalf("serial %v, want the live certificate's %v", got, live.Cert.SerialNumber)
	}

	renewed.CopyTo(t, live)
	if err := s.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	after := served()
	defer after.Close()
	if got := after.ConnectionState().PeerCertificates[0].SerialNumber; got.Cmp(renewed.Cert.SerialNumber) != 0 {
		t.Fatalf("after reload serial %v, want the renewed certificate's %v", got, renewed.Cert.SerialNumber)
	}
	if s.Leaf().SerialNumber.Cmp(renewed.Cert.SerialNumber) != 0 {
		t.Fatal("Leaf is not the renewed certificate")
	}
	// The connection made before the reload still works.
	if _, err := before.Write([]byte{2}); err != nil {
		t.Fatalf("old connection after reload: %v", err)
	}
	if _, err := io.ReadFull(before, make([]byte, 1)); err != nil {
		t.Fatalf("old connection after reload: %v", err)
	}

	// A broken reload keeps the certificate in use.
	if err := os.WriteFile(live.KeyFile, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(); err == nil || !strings.Contains(err.Error(), "previous certificate kept") {
		t.Fatalf("Reload with a broken key = %v, want an error", err)
	}
	c := served()
	defer c.Close()
	if got := c.ConnectionState().PeerCertificates[0].SerialNumber; got.Cmp(renewed.Cert.SerialNumber) != 0 {
		t.Fatalf("after failed reload serial %v, want %v", got, renewed.Cert.SerialNumber)
	}
}

func TestClientConfig(t *testing.T) {
	if tc, err := (tlsconfig.ClientConfig{}).TLSConfig(); tc != nil || err != nil {
		t.Fatalf("zero ClientConfig = %v, %v; want plaintext", tc, err)
	}
	tc, err := (tlsconfig.ClientConfig{Enabled: true}).TLSConfig()
	if err != nil || tc == nil || tc.RootCAs != nil {
		t.Fatalf("--tls alone = %+v, %v; want system roots", tc, err)
	}
	if _, err := (tlsconfig.ClientConfig{CertFile: "c"}).TLSConfig(); err == nil || !strings.Contains(err.Error(), "give both or neither") {
		t.Fatalf("cert without key: %v", err)
	}
	if _, err := (tlsconfig.ClientConfig{CAFile: "/nonexistent"}).TLSConfig(); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing CA file: %v", err)
	}
}

// TLS 1.2 offers only ECDHE AEAD suites: HTTP/2 forbids the CBC ones (RFC
// 9113 appendix A), so a client offering only CBC is refused.
func TestCipherSuitesAEADOnly(t *testing.T) {
	for _, id := range tlsconfig.CipherSuites {
		name := tls.CipherSuiteName(id)
		if !strings.HasPrefix(name, "TLS_ECDHE_") || !(strings.Contains(name, "_GCM_") || strings.Contains(name, "CHACHA20_POLY1305")) {
			t.Errorf("suite %s is not ECDHE with an AEAD", name)
		}
	}
	ca := tlstest.NewCA(t, "ca")
	srv := ca.Server(t, "server")
	s, err := tlsconfig.NewServer(tlsconfig.ServerConfig{CertFile: srv.CertFile, KeyFile: srv.KeyFile}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, s)
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	handshake := func(suite uint16) (tls.ConnectionState, error) {
		d := &net.Dialer{Timeout: 5 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{
			RootCAs: roots, ServerName: "localhost",
			MinVersion: tls.VersionTLS12, MaxVersion: tls.VersionTLS12,
			CipherSuites: []uint16{suite},
		})
		if err != nil {
			return tls.ConnectionState{}, err
		}
		defer c.Close()
		return c.ConnectionState(), nil
	}
	for _, suite := range []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA} {
		if _, err := handshake(suite); err == nil {
			t.Errorf("%s accepted, want the handshake refused", tls.CipherSuiteName(suite))
		}
	}
	for _, suite := range []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256} {
		st, err := handshake(suite)
		if err != nil {
			t.Errorf("%s refused: %v", tls.CipherSuiteName(suite), err)
			continue
		}
		if st.CipherSuite != suite {
			t.Errorf("negotiated %s, want %s", tls.CipherSuiteName(st.CipherSuite), tls.CipherSuiteName(suite))
		}
	}
	// The client side offers the same suites.
	tc, err := tlsconfig.ClientConfig{Enabled: true}.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	if len(tc.CipherSuites) != len(tlsconfig.CipherSuites) {
		t.Errorf("client suites %v, want %v", tc.CipherSuites, tlsconfig.CipherSuites)
	}
}

// A certificate that has expired is logged at ERROR level (and still
// served), one expiring within ExpiryWarning at WARN level, both at
// start-up and on reload, each saying what to do; OnLoad sees every load.
func TestCertExpiryLogged(t *testing.T) {
	ca := tlstest.NewCA(t, "ca")
	fresh := ca.Server(t, "fresh")
	soon := ca.ServerUntil(t, "soon", time.Now().Add(3*24*time.Hour))
	expired := ca.ServerUntil(t, "expired", time.Now().Add(-time.Hour))
	tests := []struct {
		name  string
		pair  tlstest.Pair
		level zapcore.Level
		msg   string
	}{
		{"fresh", fresh, zapcore.InfoLevel, "TLS certificate loaded"},
		{"soon", soon, zapcore.WarnLevel, "expires soon"},
		{"expired", expired, zapcore.ErrorLevel, "HAS EXPIRED"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.DebugLevel)
			var seen []time.Time
			cfg := tlsconfig.ServerConfig{CertFile: tt.pair.CertFile, KeyFile: tt.pair.KeyFile,
				OnLoad: func(leaf *x509.Certificate) { seen = append(seen, leaf.NotAfter) }}
			s, err := tlsconfig.NewServer(cfg, zap.New(core))
			if err != nil {
				t.Fatalf("NewServer: %v (an expired certificate is still served)", err)
			}
			if err := s.Reload(); err != nil {
				t.Fatal(err)
			}
			entries := logs.All()
			if len(entries) != 2 {
				t.Fatalf("%d log entries, want 2 (load, reload): %v", len(entries), entries)
			}
			for _, e := range entries {
				if e.Level != tt.level || !strings.Contains(e.Message, strings.TrimPrefix(tt.msg, "TLS certificate loaded")) {
					t.Errorf("logged %s %q, want %s containing %q", e.Level, e.Message, tt.level, tt.msg)
				}
				if tt.level > zapcore.InfoLevel && !strings.Contains(e.Message, "systemctl reload nitrosign-proxy") {
					t.Errorf("%q does not say what to do", e.Message)
				}
			}
			if !strings.Contains(entries[0].Message, "loaded") || !strings.Contains(entries[1].Message, "reloaded") {
				t.Errorf("messages %q, %q: want loaded, then reloaded", entries[0].Message, entries[1].Message)
			}
			if len(seen) != 2 || !seen[0].Equal(tt.pair.Cert.NotAfter) || !seen[1].Equal(tt.pair.Cert.NotAfter) {
				t.Errorf("OnLoad saw %v, want %v twice", seen, tt.pair.Cert.NotAfter)
			}
		})
	}
	// A reload onto a renewed certificate goes back to INFO.
	core, logs := observer.New(zapcore.DebugLevel)
	live := ca.ServerUntil(t, "live", time.Now().Add(-time.Hour))
	s, err := tlsconfig.NewServer(tlsconfig.ServerConfig{CertFile: live.CertFile, KeyFile: live.KeyFile}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	ca.Server(t, "renewed").CopyTo(t, live)
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if e := logs.All(); len(e) != 2 || e[0].Level != zapcore.ErrorLevel || e[1].Level != zapcore.InfoLevel {
		t.Fatalf("entries %v: want ERROR (expired), then INFO (renewed)", e)
	}
}
