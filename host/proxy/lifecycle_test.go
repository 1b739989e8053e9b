package proxy_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/metadata"

	"github.com/nitrosign/nitrosign/host/pool/pooltest"
	"github.com/nitrosign/nitrosign/host/proxy"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*proxy.Config)
		wantErr string // "" means valid
	}{
		{"defaults", func(*proxy.Config) {}, ""},
		{"tcp upstream", func(c *proxy.Config) { c.Upstreams = []string{"tcp://127.0.0.1:5005"} }, ""},
		{"vsock loopback upstream", func(c *proxy.Config) { c.Upstreams = []string{"vsock://1:5005"} }, ""},
		{"listen any port", func(c *proxy.Config) { c.Listen = "127.0.0.1:0" }, ""},
		{"listen all interfaces, insecure", func(c *proxy.Config) { c.Listen = ":8443"; c.Insecure = true }, ""},
		{"listen all interfaces, tls", func(c *proxy.Config) { c.Listen = ":8443"; c.TLS.CertFile, c.TLS.KeyFile = "c", "k" }, ""},
		{"listen all interfaces, plaintext", func(c *proxy.Config) { c.Listen = ":8443" }, `listen address ":8443" is not loopback and the port has no TLS`},
		{"listen private address, plaintext", func(c *proxy.Config) { c.Listen = "10.0.0.5:8443" }, "--insecure to serve plaintext anyway"},
		{"listen localhost, plaintext", func(c *proxy.Config) { c.Listen = "localhost:8443" }, ""},
		{"listen ::1, plaintext", func(c *proxy.Config) { c.Listen = "[::1]:8443" }, ""},
		{"insecure with tls", func(c *proxy.Config) { c.Insecure = true; c.TLS.CertFile, c.TLS.KeyFile = "c", "k" }, "contradicts --tls-cert"},
		{"tls key missing", func(c *proxy.Config) { c.TLS.CertFile = "c" }, "add --tls-key"},
		{"metrics listen without port", func(c *proxy.Config) { c.Metrics.Listen = "127.0.0.1" }, `metrics listen address "127.0.0.1"`},
		{"metrics listen", func(c *proxy.Config) { c.Metrics.Listen = "127.0.0.1:0" }, ""},
		{"listen without port", func(c *proxy.Config) { c.Listen = "127.0.0.1" }, `listen address "127.0.0.1": want HOST:PORT`},
		{"listen bad port", func(c *proxy.Config) { c.Listen = "127.0.0.1:http" }, "port must be a number 0-65535"},
		{"listen port too big", func(c *proxy.Config) { c.Listen = "127.0.0.1:70000" }, "port must be a number 0-65535"},
		{"upstream without scheme", func(c *proxy.Config) { c.Upstreams = []string{"16:5005"} }, `upstream: invalid target "16:5005": want vsock://CID:PORT or tcp://HOST:PORT`},
		{"upstream unknown scheme", func(c *proxy.Config) { c.Upstreams = []string{"unix:///tmp/x"} }, `unknown scheme "unix"`},
		{"upstream empty", func(c *proxy.Config) { c.Upstreams = []string{""} }, "upstream: invalid target"},
		{"upstream CID 0", func(c *proxy.Config) { c.Upstreams = []string{"vsock://0:5005"} }, "CID 0 is the hypervisor"},
		{"upstream CID any", func(c *proxy.Config) { c.Upstreams = []string{"vsock://4294967295:5005"} }, "VMADDR_CID_ANY"},
		{"no upstream", func(c *proxy.Config) { c.Upstreams = nil }, "upstream: none given"},
		{"two upstreams", func(c *proxy.Config) { c.Upstreams = []string{"vsock://16:5005", "vsock://17:5005"} }, ""},
		{"upstream twice", func(c *proxy.Config) { c.Upstreams = []string{"vsock://16:5005", "vsock://16:5005"} }, `upstream "vsock://16:5005" given twice`},
		{"upstream heartbeat port", func(c *proxy.Config) { c.Upstreams = []string{"vsock://16:9000"} }, "port 9000 is reserved"},
		{"pool size zero", func(c *proxy.Config) { c.Pool.Size = 0 }, "pool size 0: must be between 1 and 256"},
		{"pool size negative", func(c *proxy.Config) { c.Pool.Size = -3 }, "pool size -3"},
		{"graceful timeout", func(c *proxy.Config) { c.GracefulStopTimeout = 0 }, "graceful stop timeout 0s: must be > 0"},
		{"max recv", func(c *proxy.Config) { c.Limits.MaxRecvMsgSize = 0 }, "max receive message size 0"},
		{"max send", func(c *proxy.Config) { c.MaxSendMsgSize = -1 }, "max send message size -1"},
		{"log level", func(c *proxy.Config) { c.Log.Level = "loud" }, `log level "loud"`},
		{"log format", func(c *proxy.Config) { c.Log.Format = "xml" }, `log format "xml"`},
		{"several at once", func(c *proxy.Config) { c.Pool.Size = 0; c.Upstreams = []string{"x"} }, "pool size 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := proxy.DefaultConfig()
			tt.mutate(&c)
			err := c.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Validate = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestNewWarnsBeyondLoopback(t *testing.T) {
	u := pooltest.Start(t)
	tests := []struct {
		listen   string
		wantWarn bool
	}{
		{"127.0.0.1:8443", false},
		{"[::1]:8443", false},
		{"localhost:8443", false},
		{"0.0.0.0:8443", true},
		{":8443", true},
		{"10.0.0.5:8443", true},
	}
	for _, tt := range tests {
		t.Run(tt.listen, func(t *testing.T) {
			core, logs := observer.New(zapcore.WarnLevel)
			cfg := proxy.DefaultConfig()
			cfg.Listen = tt.listen
			cfg.Insecure = true // plaintext beyond loopback: allowed only so
			cfg.Upstreams = []string{u.Target().String()}
			cfg.Pool.Size = 1
			pl, err := proxy.NewUpstreams(cfg, zap.NewNop())
			if err != nil {
				t.Fatal(err)
			}
			px, err := proxy.New(cfg, pl, zap.New(core))
			if err != nil {
				_ = pl.Close()
				t.Fatal(err)
			}
			if err := px.Stop(context.Background()); err != nil {
				t.Fatal(err)
			}
			warned := logs.FilterMessageSnippet("BEYOND LOOPBACK").Len() > 0
			if warned != tt.wantWarn {
				t.Fatalf("warned = %v, want %v (logs %v)", warned, tt.wantWarn, logs.All())
			}
		})
	}
}

func TestNewRejects(t *testing.T) {
	pl, err := proxy.NewUpstreams(proxy.DefaultConfig(), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pl.Close() })
	bad := proxy.DefaultConfig()
	bad.GracefulStopTimeout = -1
	if _, err := proxy.New(bad, pl, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "graceful stop timeout") {
		t.Fatalf("New with bad config = %v", err)
	}
	if _, err := proxy.New(proxy.DefaultConfig(), nil, zap.NewNop()); err == nil {
		t.Fatal("New with nil pool succeeded")
	}
}

// The graph the binary runs (proxy.Options) is complete and acyclic.
func TestValidateApp(t *testing.T) {
	if err := fx.ValidateApp(proxy.Options(proxy.DefaultConfig())); err != nil {
		t.Fatalf("fx.ValidateApp: %v", err)
	}
}

// The binary's graph runs: start serves on the injected listener, a call
// goes through, stop drains and ends Serve.
func TestFxLifecycle(t *testing.T) {
	u := pooltest.Start(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{u.Target().String()}
	cfg.Pool.Size = 2
	var px *proxy.Proxy
	app := fxtest.New(t,
		proxy.Options(cfg),
		fx.Provide(func() net.Listener { return l }),
		fx.Decorate(func() *zap.Logger { return zaptest.NewLogger(t) }),
		fx.Populate(&px),
	)
	app.RequireStart()
	if px.Addr() == nil {
		// Serve runs in a goroutine; wait until it has taken the listener.
		eventually(t, 5*time.Second, "proxy serving", func() bool { return px.Addr() != nil })
	}
	cc := dialProxy(t, l.Addr().String())
	eventually(t, 10*time.Second, "a call through the proxy", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := nitrosignv1.NewEchoServiceClient(cc).Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("fx")})
		return err == nil
	})
	app.RequireStop()
	if _, err := net.DialTimeout("tcp", l.Addr().String(), time.Second); err == nil {
		t.Fatal("listener still accepting after stop")
	}
}

func TestFxStartFailsWhenPortTaken(t *testing.T) {
	u := pooltest.Start(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{u.Target().String()}
	cfg.Listen = taken.Addr().String()
	cfg.Pool.Size = 1
	app := fx.New(
		proxy.Options(cfg),
		fx.Decorate(func() *zap.Logger { return zaptest.NewLogger(t) }),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = app.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "proxy: listen on "+cfg.Listen) {
		t.Fatalf("Start = %v, want a listen error", err)
	}
	// fx rolls back what started; the pool's stop hook closes it.
	_ = app.Stop(ctx)
}

// Each forwarded call is logged at debug level with method, code and
// latency; payloads and metadata values never reach the log.
func TestCallLogNeverHasPayloads(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	h := newHarness(t, harnessOpts{log: zap.New(core)})
	const secret = "payload-must-not-be-logged"
	ctx := metadata.AppendToOutgoingContext(callCtx(t), "authorization", "Bearer "+secret)
	if _, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte(secret)}); err != nil {
		t.Fatalf("Echo: %v", err)
	}
	h.stop()
	var found bool
	for _, e := range logs.All() {
		fields := e.ContextMap()
		if e.Message == "call" && fields["method"] == nitrosignv1.EchoService_Echo_FullMethodName {
			found = fields["code"] == "OK" && fields["latency"] != nil
		}
		if strings.Contains(e.Message, secret) || strings.Contains(fmt.Sprint(fields), secret) {
			t.Fatalf("log entry carries the payload or metadata: %v %v", e.Message, fields)
		}
	}
	if !found {
		t.Fatal("no debug log entry for the forwarded Echo with its code and latency")
	}
}
