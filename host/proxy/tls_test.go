package proxy_test

import (
	"context"
	"crypto/tls"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/pool/pooltest"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/tlsconfig"
	"github.com/nitrosign/nitrosign/internal/tlsconfig/tlstest"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// handshakes records the serial of every server certificate a client
// verified: one entry per TLS handshake.
type handshakes struct {
	mu      sync.Mutex
	serials []*big.Int
}

func (h *handshakes) record(cs tls.ConnectionState) error {
	h.mu.Lock()
	h.serials = append(h.serials, cs.PeerCertificates[0].SerialNumber)
	h.mu.Unlock()
	return nil
}

func (h *handshakes) list() []*big.Int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*big.Int(nil), h.serials...)
}

// clientCreds are TLS credentials from a client configuration; hs, when
// not nil, records each handshake.
func clientCreds(t *testing.T, c tlsconfig.ClientConfig, hs *handshakes) grpc.DialOption {
	t.Helper()
	tc, err := c.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	if hs != nil {
		tc.VerifyConnection = hs.record
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(tc))
}

func echoOnce(t *testing.T, cc grpc.ClientConnInterface) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := nitrosignv1.NewEchoServiceClient(cc).Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("tls")})
	return err
}

func dialRaw(t *testing.T, addr string, opt grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// TLS and mutual TLS: a good client is accepted; no client certificate, a
// certificate from another CA, a plaintext client, and a client that does
// not trust the server are refused.
func TestTLSAndMutualTLS(t *testing.T) {
	ca := tlstest.NewCA(t, "proxy-ca")
	srvPair := ca.Server(t, "proxy")
	clientCA := tlstest.NewCA(t, "clients-ca")
	good := clientCA.Client(t, "good")
	rogue := tlstest.NewCA(t, "rogue-ca").Client(t, "rogue")

	plain := grpc.WithTransportCredentials(insecure.NewCredentials())
	serverOnly := tlsconfig.ClientConfig{CAFile: ca.File}
	withGood := tlsconfig.ClientConfig{CAFile: ca.File, CertFile: good.CertFile, KeyFile: good.KeyFile}
	withRogue := tlsconfig.ClientConfig{CAFile: ca.File, CertFile: rogue.CertFile, KeyFile: rogue.KeyFile}
	distrustful := tlsconfig.ClientConfig{CAFile: clientCA.File, CertFile: good.CertFile, KeyFile: good.KeyFile}

	modes := []struct {
		name string
		tls  tlsconfig.ServerConfig
		// clients and whether each must get through
		clients []struct {
			name   string
			opt    grpc.DialOption
			ok     bool
			reason string // nitrosign_proxy_tls_handshake_failures_total's, when refused
		}
	}{
		{"tls", tlsconfig.ServerConfig{CertFile: srvPair.CertFile, KeyFile: srvPair.KeyFile}, []struct {
			name   string
			opt    grpc.DialOption
			ok     bool
			reason string
		}{
			{"tls client", clientCreds(t, serverOnly, nil), true, ""},
			{"tls client with a certificate", clientCreds(t, withGood, nil), true, ""},
			{"plaintext client", plain, false, "not_tls"},
			{"client that does not trust the server", clientCreds(t, distrustful, nil), false, "server_certificate_refused"},
		}},
		{"mutual tls", tlsconfig.ServerConfig{CertFile: srvPair.CertFile, KeyFile: srvPair.KeyFile, ClientCAFile: clientCA.File}, []struct {
			name   string
			opt    grpc.DialOption
			ok     bool
			reason string
		}{
			{"good client certificate", clientCreds(t, withGood, nil), true, ""},
			{"no client certificate", clientCreds(t, serverOnly, nil), false, "no_client_certificate"},
			// Go's client sends no certificate whose issuer the server did
			// not ask for: the proxy sees none.
			{"client certificate from another CA", clientCreds(t, withRogue, nil), false, "no_client_certificate"},
			{"plaintext client", plain, false, "not_tls"},
		}},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			mx := metrics.New()
			h := newHarness(t, harnessOpts{
				poolSize:   1,
				mutate:     func(c *proxy.Config) { c.TLS = m.tls },
				clientOpts: []grpc.DialOption{clientCreds(t, withGood, nil)},
				proxyOpts:  []proxy.Option{proxy.WithObserver(mx)},
			})
			for _, c := range m.clients {
				t.Run(c.name, func(t *testing.T) {
					before := tlsFailures(t, mx, c.reason)
					err := echoOnce(t, dialRaw(t, h.addr, c.opt))
					if c.ok && err != nil {
						t.Fatalf("refused: %v", err)
					}
					if !c.ok && status.Code(err) != codes.Unavailable {
						t.Fatalf("got %v, want a refused connection (Unavailable)", err)
					}
					if c.reason != "" {
						eventually(t, 5*time.Second, "the refused handshake counted as "+c.reason, func() bool {
							return tlsFailures(t, mx, c.reason) > before
						})
					}
				})
			}
		})
	}
}

// ReloadTLS serves a renewed certificate to new connections and keeps the
// established ones (no new handshake on them).
func TestTLSReloadKeepsConnections(t *testing.T) {
	ca := tlstest.NewCA(t, "ca")
	live := ca.Server(t, "live")
	renewed := ca.Server(t, "renewed")
	client := tlsconfig.ClientConfig{CAFile: ca.File}
	h := newHarness(t, harnessOpts{
		poolSize:   1,
		mutate:     func(c *proxy.Config) { c.TLS = tlsconfig.ServerConfig{CertFile: live.CertFile, KeyFile: live.KeyFile} },
		clientOpts: []grpc.DialOption{clientCreds(t, client, nil)},
	})
	var oldHS handshakes
	old := dialRaw(t, h.addr, clientCreds(t, client, &oldHS))
	if err := echoOnce(t, old); err != nil {
		t.Fatal(err)
	}

	renewed.CopyTo(t, live)
	if err := h.proxy.ReloadTLS(); err != nil {
		t.Fatalf("ReloadTLS: %v", err)
	}
	var newHS handshakes
	if err := echoOnce(t, dialRaw(t, h.addr, clientCreds(t, client, &newHS))); err != nil {
		t.Fatal(err)
	}
	if got := newHS.list(); len(got) != 1 || got[0].Cmp(renewed.Cert.SerialNumber) != 0 {
		t.Fatalf("new connection saw serials %v, want the renewed %v", got, renewed.Cert.SerialNumber)
	}
	for range 3 {
		if err := echoOnce(t, old); err != nil {
			t.Fatalf("established connection after reload: %v", err)
		}
	}
	if got := oldHS.list(); len(got) != 1 || got[0].Cmp(live.Cert.SerialNumber) != 0 {
		t.Fatalf("established connection saw serials %v: it was redone", got)
	}

	// A broken key: the reload fails and the renewed certificate stays.
	if err := os.WriteFile(live.KeyFile, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := h.proxy.ReloadTLS(); err == nil {
		t.Fatal("ReloadTLS accepted a broken key")
	}
	var afterHS handshakes
	if err := echoOnce(t, dialRaw(t, h.addr, clientCreds(t, client, &afterHS))); err != nil {
		t.Fatal(err)
	}
	if got := afterHS.list(); len(got) != 1 || got[0].Cmp(renewed.Cert.SerialNumber) != 0 {
		t.Fatalf("after a failed reload the proxy served %v, want %v", got, renewed.Cert.SerialNumber)
	}
}

// The binary's graph reloads the certificate on SIGHUP.
func TestSIGHUPReloadsTLS(t *testing.T) {
	u := pooltest.Start(t)
	ca := tlstest.NewCA(t, "ca")
	live := ca.Server(t, "live")
	renewed := ca.Server(t, "renewed")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{u.Target().String()}
	cfg.Pool.Size = 1
	cfg.TLS = tlsconfig.ServerConfig{CertFile: live.CertFile, KeyFile: live.KeyFile}
	app := fxtest.New(t,
		proxy.Options(cfg),
		fx.Provide(func() net.Listener { return l }),
		fx.Decorate(func() *zap.Logger { return zaptest.NewLogger(t) }),
	)
	app.RequireStart()
	defer app.RequireStop()
	client := tlsconfig.ClientConfig{CAFile: ca.File}
	served := func() *big.Int {
		var hs handshakes
		cc := dialRaw(t, l.Addr().String(), clientCreds(t, client, &hs))
		defer cc.Close()
		var err error
		eventually(t, 10*time.Second, "a call over TLS", func() bool { err = echoOnce(t, cc); return err == nil })
		return hs.list()[0]
	}
	if got := served(); got.Cmp(live.Cert.SerialNumber) != 0 {
		t.Fatalf("serial %v before SIGHUP, want %v", got, live.Cert.SerialNumber)
	}
	renewed.CopyTo(t, live)
	// The proxy's hook has registered for SIGHUP (after RequireStart), so
	// the signal reloads instead of ending the test process.
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the renewed certificate served", func() bool {
		return served().Cmp(renewed.Cert.SerialNumber) == 0
	})
}

// A certificate that cannot be loaded fails New, naming the file.
func TestNewFailsOnBadCertificate(t *testing.T) {
	u := pooltest.Start(t)
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{u.Target().String()}
	cfg.Pool.Size = 1
	cfg.TLS = tlsconfig.ServerConfig{CertFile: "/nonexistent/server.pem", KeyFile: "/nonexistent/key.pem"}
	pl, err := proxy.NewUpstreams(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pl.Close() })
	if _, err := proxy.New(cfg, pl, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "/nonexistent/server.pem") {
		t.Fatalf("New = %v, want an error naming the certificate file", err)
	}
}

// tlsFailures is nitrosign_proxy_tls_handshake_failures_total{reason}.
func tlsFailures(t *testing.T, m *metrics.Metrics, reason string) float64 {
	t.Helper()
	if reason == "" {
		return 0
	}
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "nitrosign_proxy_tls_handshake_failures_total" {
			continue
		}
		for _, mm := range f.GetMetric() {
			for _, l := range mm.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return mm.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no nitrosign_proxy_tls_handshake_failures_total{reason=%q}", reason)
	return 0
}
