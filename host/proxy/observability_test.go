package proxy_test

import (
	"context"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/metrics/metricstest"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/requestid"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// stack is the real enclave graph (on TCP loopback) behind the binary's
// proxy graph (proxy.Options) with its metrics endpoint, each side logging
// at debug level into an observer.
type stack struct {
	cc         *grpc.ClientConn
	metricsURL string
	proxyLogs  *observer.ObservedLogs
	encLogs    *observer.ObservedLogs
	enclave    *enclavetest.Enclave
}

func newStack(t *testing.T) *stack {
	t.Helper()
	encCore, encLogs := observer.New(zapcore.DebugLevel)
	e, err := enclavetest.Run(enclavetest.DefaultConfig(), zap.New(encCore), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Stop() })

	pxCore, pxLogs := observer.New(zapcore.DebugLevel)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ml, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{e.Target}
	cfg.Pool.Size = 2
	var pl *proxy.Upstreams
	app := fxtest.New(t,
		proxy.Options(cfg),
		fx.Provide(func() net.Listener { return l }),
		fx.Provide(fx.Annotate(func() net.Listener { return ml }, fx.ResultTags(`name:"metrics"`))),
		fx.Decorate(func() *zap.Logger { return zap.New(pxCore) }),
		fx.Populate(&pl),
	)
	app.RequireStart()
	t.Cleanup(app.RequireStop)
	eventually(t, 10*time.Second, "both pool connections READY", func() bool { return pl.Ready() == 2 })
	return &stack{
		cc:         dialProxy(t, l.Addr().String()),
		metricsURL: "http://" + ml.Addr().String() + "/metrics",
		proxyLogs:  pxLogs,
		encLogs:    encLogs,
		enclave:    e,
	}
}

func scrape(t *testing.T, url string) metricstest.Families {
	t.Helper()
	f, text, err := metricstest.Scrape(callCtx(t), url)
	if err != nil {
		t.Fatalf("scrape %s: %v\n%s", url, err, text)
	}
	return f
}

func wantMetric(t *testing.T, f metricstest.Families, name string, labels map[string]string, v float64) {
	t.Helper()
	got, ok := f.Value(name, labels)
	if !ok {
		t.Errorf("%s%v absent; series: %v", name, labels, f.Labels(name))
		return
	}
	if got != v {
		t.Errorf("%s%v = %v, want %v", name, labels, got, v)
	}
}

func signECC(ctx context.Context, cc grpc.ClientConnInterface, alg nitrosignv1.SigningAlgorithm) error {
	_, err := nitrosignv1.NewSignerServiceClient(cc).Sign(ctx, &nitrosignv1.SignRequest{
		Key:              &nitrosignv1.KeySelector{Selector: &nitrosignv1.KeySelector_KeyType{KeyType: nitrosignv1.KeyType_KEY_TYPE_ECC}},
		Message:          []byte("metrics"),
		MessageType:      nitrosignv1.MessageType_MESSAGE_TYPE_RAW,
		SigningAlgorithm: alg,
	})
	return err
}

// After known traffic through the proxy, its /metrics text parses and the
// proxy's counters and the enclave's (scraped over the upstream hop through
// StatsService) match the traffic.
func TestMetricsAfterKnownTraffic(t *testing.T) {
	s := newStack(t)
	echo := nitrosignv1.NewEchoServiceClient(s.cc)
	for range 5 {
		if _, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{Payload: []byte("m")}); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		if err := signECC(callCtx(t), s.cc, nitrosignv1.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED); err != nil {
			t.Fatal(err)
		}
	}
	if err := signECC(callCtx(t), s.cc, nitrosignv1.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ECC key, RSA algorithm: %v, want InvalidArgument", err)
	}
	err := s.cc.Invoke(callCtx(t), "/no.such.Service/Call", &nitrosignv1.EchoRequest{}, &nitrosignv1.EchoResponse{})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("unknown method: %v, want Unimplemented", err)
	}

	f := scrape(t, s.metricsURL)
	echoM, signM := nitrosignv1.EchoService_Echo_FullMethodName, nitrosignv1.SignerService_Sign_FullMethodName
	// The proxy's view.
	wantMetric(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": echoM, "code": "OK"}, 5)
	wantMetric(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": signM, "code": "OK"}, 3)
	wantMetric(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": signM, "code": "InvalidArgument"}, 1)
	wantMetric(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": metrics.OtherMethod, "code": "Unimplemented"}, 1)
	wantMetric(t, f, "nitrosign_proxy_call_duration_seconds", map[string]string{"method": echoM}, 5)
	wantMetric(t, f, "nitrosign_proxy_call_duration_seconds", map[string]string{"method": signM}, 4)
	wantMetric(t, f, "nitrosign_proxy_calls_in_flight", nil, 0)
	wantMetric(t, f, "nitrosign_proxy_upstream_errors_total", nil, 0) // caller mistakes are not upstream errors
	wantMetric(t, f, "nitrosign_proxy_pool_connections", map[string]string{"state": "ready"}, 2)
	wantMetric(t, f, "nitrosign_proxy_pool_redials_total", nil, 0)
	// The enclave's view, fetched through the pool at scrape time.
	wantMetric(t, f, "nitrosign_enclave_up", nil, 1)
	wantMetric(t, f, "nitrosign_enclave_calls_total", map[string]string{"method": echoM, "code": "OK"}, 5)
	wantMetric(t, f, "nitrosign_enclave_calls_total", map[string]string{"method": signM, "code": "OK"}, 3)
	wantMetric(t, f, "nitrosign_enclave_calls_total", map[string]string{"method": signM, "code": "InvalidArgument"}, 1)
	wantMetric(t, f, "nitrosign_enclave_signatures_total", map[string]string{"algorithm": "ECDSA_SHA_256"}, 3)
	wantMetric(t, f, "nitrosign_enclave_nsm_calls_total", map[string]string{"operation": "seed_entropy", "result": "ok"}, 1)
	wantMetric(t, f, "nitrosign_enclave_nsm_calls_total", map[string]string{"operation": "attestation", "result": "ok"}, 1)
	if got := f.Labels("nitrosign_enclave_key_generation_seconds"); len(got) != 3 {
		t.Errorf("key generation series %v, want RSA, ECC and Ed25519", got)
	}
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if _, ok := f[name]; !ok {
			t.Errorf("%s missing", name)
		}
	}

	// The enclave goes away: the next scrape says so, and a call is an
	// upstream error (no ready connection).
	if err := s.enclave.Stop(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "no ready connection", func() bool {
		v, _ := scrape(t, s.metricsURL).Value("nitrosign_proxy_pool_connections", map[string]string{"state": "ready"})
		return v == 0
	})
	if _, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("Echo with the enclave down: %v, want Unavailable", err)
	}
	f = scrape(t, s.metricsURL)
	wantMetric(t, f, "nitrosign_enclave_up", nil, 0)
	wantMetric(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonNoReadyConnection}, 1)
	wantMetric(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": echoM, "code": "Unavailable"}, 1)
}

// A request id reaches the enclave in metadata, and both sides log it: the
// client's own id when it is well formed, a new one otherwise.
func TestRequestIDPropagated(t *testing.T) {
	s := newStack(t)
	echo := nitrosignv1.NewEchoServiceClient(s.cc)
	tests := []struct {
		name   string
		sent   string // "" = none
		keepIt bool
	}{
		{"client id kept", "client-req-42", true},
		{"no id: proxy makes one", "", false},
		{"malformed id replaced", `bad "id" with spaces`, false},
		{"overlong id replaced", strings.Repeat("a", requestid.MaxLen+1), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.proxyLogs.TakeAll()
			s.encLogs.TakeAll()
			ctx := callCtx(t)
			if tt.sent != "" {
				ctx = metadata.AppendToOutgoingContext(ctx, requestid.Key, tt.sent)
			}
			if _, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("id")}); err != nil {
				t.Fatal(err)
			}
			// The proxy logs after the call ends; wait for it.
			var pxID string
			eventually(t, 5*time.Second, "the proxy's call log", func() bool {
				for _, e := range s.proxyLogs.FilterMessage("call").All() {
					if f := e.ContextMap(); f["method"] == nitrosignv1.EchoService_Echo_FullMethodName {
						pxID, _ = f[requestid.LogField].(string)
						return true
					}
				}
				return false
			})
			if !requestid.Valid(pxID) {
				t.Fatalf("proxy logged request id %q", pxID)
			}
			if tt.keepIt && pxID != tt.sent {
				t.Fatalf("proxy logged %q, want the client's %q", pxID, tt.sent)
			}
			if !tt.keepIt && pxID == tt.sent {
				t.Fatalf("proxy kept the malformed id %q", pxID)
			}
			var encID string
			for _, e := range s.encLogs.FilterMessage("call").All() {
				if f := e.ContextMap(); f["method"] == nitrosignv1.EchoService_Echo_FullMethodName {
					encID, _ = f[requestid.LogField].(string)
				}
			}
			if encID != pxID {
				t.Fatalf("enclave logged request id %q, proxy %q", encID, pxID)
			}
		})
	}
}

// Upstream errors are counted by reason; a caller's mistake is not one.
func TestUpstreamErrorsCounted(t *testing.T) {
	m := metrics.New()
	h := newHarness(t, harnessOpts{poolSize: 1, proxyOpts: []proxy.Option{proxy.WithObserver(m)}})
	srv := httptest.NewServer(metrics.Handler(m.Registry()))
	t.Cleanup(srv.Close)
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	answer := func(code codes.Code) {
		h.up.Echo.EchoF.Set(func(context.Context, *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
			return nil, status.Error(code, "as told")
		})
		if _, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{}); status.Code(err) != code {
			t.Fatalf("Echo = %v, want %v", err, code)
		}
	}
	answer(codes.InvalidArgument)
	answer(codes.NotFound)
	answer(codes.Internal)
	answer(codes.Unknown)
	answer(codes.Unavailable)
	f := scrape(t, srv.URL+"/metrics")
	wantMetric(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonServerFault}, 2)
	wantMetric(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonUnavailable}, 1)
	wantMetric(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonNoReadyConnection}, 0)
	wantMetric(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": nitrosignv1.EchoService_Echo_FullMethodName}, 5)

	h.up.Stop()
	eventually(t, 10*time.Second, "pool not ready", func() bool { return h.pool.Ready() == 0 })
	if _, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("Echo with upstream down = %v", err)
	}
	f = scrape(t, srv.URL+"/metrics")
	wantMetric(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonNoReadyConnection}, 1)
}
