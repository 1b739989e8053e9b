package tlsconfig_test

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

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
