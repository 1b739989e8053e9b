package metrics_test

import (
	"context"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/metrics/metricstest"
	"github.com/nitrosign/nitrosign/host/pool"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serve runs m's registry on 127.0.0.1:0 and returns the /metrics URL.
func serve(t *testing.T, m *metrics.Metrics) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := metrics.NewServer(m.Registry(), zaptest.NewLogger(t))
	s.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return "http://" + s.Addr().String() + "/metrics"
}

func scrape(t *testing.T, url string) metricstest.Families {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, text, err := metricstest.Scrape(ctx, url)
	if err != nil {
		t.Fatalf("scrape: %v\n%s", err, text)
	}
	return f
}

func want(t *testing.T, f metricstest.Families, name string, labels map[string]string, v float64) {
	t.Helper()
	got, ok := f.Value(name, labels)
	if !ok {
		t.Errorf("%s%v: absent (have %v)", name, labels, f.Labels(name))
		return
	}
	if got != v {
		t.Errorf("%s%v = %v, want %v", name, labels, got, v)
	}
}

func TestMethodLabel(t *testing.T) {
	tests := []struct{ in, want string }{
		{pb.SignerService_Sign_FullMethodName, pb.SignerService_Sign_FullMethodName},
		{pb.StatsService_GetStats_FullMethodName, pb.StatsService_GetStats_FullMethodName},
		{"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Check"},
		{"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"},
		{"/nitrosign.v1.SignerService/Nope", metrics.OtherMethod},
		{"/attacker.Random/" + strings.Repeat("x", 100), metrics.OtherMethod},
		{"", metrics.OtherMethod},
	}
	for _, tt := range tests {
		if got := metrics.MethodLabel(tt.in); got != tt.want {
			t.Errorf("MethodLabel(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestObserverAndProcessMetrics(t *testing.T) {
	m := metrics.New()
	url := serve(t, m)
	for range 3 {
		m.CallStarted(pb.EchoService_Echo_FullMethodName)
		m.CallFinished(pb.EchoService_Echo_FullMethodName, codes.OK, 2*time.Millisecond)
	}
	m.CallStarted("/x.Y/Z")
	m.CallFinished("/x.Y/Z", codes.Unimplemented, time.Millisecond)
	m.CallStarted("/x.Y/Z")
	m.CallFinished("/x.Y/Z", codes.Code(42), time.Millisecond) // beyond the known codes
	m.CallStarted(pb.SignerService_Sign_FullMethodName)        // still in flight
	m.UpstreamError(metrics.ReasonNoReadyConnection)
	m.UpstreamError(metrics.ReasonNoReadyConnection)
	m.UpstreamError("made-up") // folded into server_fault

	f := scrape(t, url)
	want(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": pb.EchoService_Echo_FullMethodName, "code": "OK"}, 3)
	want(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": metrics.OtherMethod, "code": "Unimplemented"}, 1)
	want(t, f, "nitrosign_proxy_call_duration_seconds", map[string]string{"method": pb.EchoService_Echo_FullMethodName}, 3)
	want(t, f, "nitrosign_proxy_calls_total", map[string]string{"method": metrics.OtherMethod, "code": "Code(42)"}, 1)
	want(t, f, "nitrosign_proxy_call_duration_seconds", map[string]string{"method": metrics.OtherMethod}, 2)
	want(t, f, "nitrosign_proxy_calls_in_flight", nil, 1)
	// Series appear once used: none for the call still in flight.
	for _, name := range []string{"nitrosign_proxy_calls_total", "nitrosign_proxy_call_duration_seconds"} {
		for _, mm := range f[name].GetMetric() {
			for _, l := range mm.GetLabel() {
				if l.GetName() == "method" && l.GetValue() == pb.SignerService_Sign_FullMethodName {
					t.Errorf("%s has a Sign series before any Sign finished", name)
				}
			}
		}
	}
	want(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonNoReadyConnection}, 2)
	want(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonServerFault}, 1)
	want(t, f, "nitrosign_proxy_upstream_errors_total", map[string]string{"reason": metrics.ReasonUnavailable}, 0)
	for _, name := range []string{"go_goroutines", "process_start_time_seconds", "process_resident_memory_bytes"} {
		if _, ok := f[name]; !ok {
			t.Errorf("%s missing: Go and process collectors", name)
		}
	}
	// The histogram's 2 ms calls fall in the 2.5 ms bucket, not the 1 ms one.
	for _, mm := range f["nitrosign_proxy_call_duration_seconds"].GetMetric() {
		if mm.GetLabel()[0].GetValue() != pb.EchoService_Echo_FullMethodName {
			continue
		}
		for _, b := range mm.GetHistogram().GetBucket() {
			if b.GetUpperBound() == 0.001 && b.GetCumulativeCount() != 0 {
				t.Errorf("1 ms bucket holds %d", b.GetCumulativeCount())
			}
			if b.GetUpperBound() == 0.0025 && b.GetCumulativeCount() != 3 {
				t.Errorf("2.5 ms bucket holds %d, want 3", b.GetCumulativeCount())
			}
		}
	}
}

type fakePool []pool.ConnStats

func (f fakePool) Stats() []metrics.SlotStats {
	out := make([]metrics.SlotStats, len(f))
	for i, s := range f {
		out[i] = metrics.SlotStats{ConnStats: s, Upstream: "vsock://16:5005"}
	}
	return out
}

func TestPoolCollector(t *testing.T) {
	m := metrics.New()
	m.RegisterPool(fakePool{
		{Index: 0, State: connectivity.Ready, Dials: 1, Readies: 1},
		{Index: 1, State: connectivity.Ready, Dials: 4, DialErrors: 2, Readies: 2},
		{Index: 2, State: connectivity.TransientFailure, Dials: 3, DialErrors: 3, Readies: 0},
		{Index: 3, State: connectivity.Connecting, Dials: 0},
	})
	f := scrape(t, serve(t, m))
	for state, n := range map[string]float64{"ready": 2, "transient_failure": 1, "connecting": 1, "idle": 0, "shutdown": 0} {
		want(t, f, "nitrosign_proxy_pool_connections", map[string]string{"state": state}, n)
	}
	want(t, f, "nitrosign_proxy_pool_redials_total", nil, 0+3+2)
	want(t, f, "nitrosign_proxy_pool_dial_errors_total", nil, 5)
	want(t, f, "nitrosign_proxy_pool_reconnects_total", nil, 1)
}

// statsStub serves GetStats from a function.
type statsStub struct {
	pb.UnimplementedStatsServiceServer
	mu sync.Mutex
	fn func() (*pb.GetStatsResponse, error)
}

func (s *statsStub) GetStats(context.Context, *pb.GetStatsRequest) (*pb.GetStatsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fn()
}

func TestEnclaveCollector(t *testing.T) {
	stub := &statsStub{}
	srv := grpc.NewServer()
	pb.RegisterStatsServiceServer(srv, stub)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient("passthrough:///"+l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })

	m := metrics.New()
	m.RegisterEnclave(cc, time.Second, zaptest.NewLogger(t))
	url := serve(t, m)
	start := time.Unix(1700000000, 500_000_000)
	stub.fn = func() (*pb.GetStatsResponse, error) {
		return &pb.GetStatsResponse{
			StartTime: timestamppb.New(start),
			Calls: []*pb.CallCount{
				{Method: pb.SignerService_Sign_FullMethodName, Code: "OK", Count: 7},
				{Method: pb.SignerService_Sign_FullMethodName, Code: "InvalidArgument", Count: 2},
				{Method: "/evil/" + strings.Repeat("m", 50), Code: "Bogus", Count: 1},
				{Method: "/evil/other", Code: "Bogus", Count: 2},
			},
			Signatures: []*pb.SignatureCount{
				{Algorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256, Count: 5},
				{Algorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256, Count: 2},
			},
			KeyGenerations: []*pb.KeyGeneration{
				{KeyId: "a", KeyType: pb.KeyType_KEY_TYPE_RSA, KeySpec: pb.KeySpec_KEY_SPEC_RSA_2048, Duration: durationpb.New(1500 * time.Millisecond)},
			},
			NsmCalls: []*pb.NsmCallCount{
				{Operation: "attestation", Count: 3},
				{Operation: "attestation", Error: true, Count: 1},
				{Operation: "seed_entropy", Count: 1},
			},
		}, nil
	}
	f := scrape(t, url)
	want(t, f, "nitrosign_enclave_up", nil, 1)
	want(t, f, "nitrosign_enclave_start_time_seconds", nil, 1700000000.5)
	want(t, f, "nitrosign_enclave_calls_total", map[string]string{"method": pb.SignerService_Sign_FullMethodName, "code": "OK"}, 7)
	want(t, f, "nitrosign_enclave_calls_total", map[string]string{"method": pb.SignerService_Sign_FullMethodName, "code": "InvalidArgument"}, 2)
	want(t, f, "nitrosign_enclave_calls_total", map[string]string{"method": metrics.OtherMethod, "code": "Unknown"}, 3)
	want(t, f, "nitrosign_enclave_signatures_total", map[string]string{"algorithm": "ECDSA_SHA_256"}, 5)
	want(t, f, "nitrosign_enclave_signatures_total", map[string]string{"algorithm": "RSASSA_PSS_SHA_256"}, 2)
	want(t, f, "nitrosign_enclave_key_generation_seconds", map[string]string{"key_type": "RSA", "key_spec": "RSA_2048"}, 1.5)
	want(t, f, "nitrosign_enclave_nsm_calls_total", map[string]string{"operation": "attestation", "result": "ok"}, 3)
	want(t, f, "nitrosign_enclave_nsm_calls_total", map[string]string{"operation": "attestation", "result": "error"}, 1)
	want(t, f, "nitrosign_enclave_nsm_calls_total", map[string]string{"operation": "seed_entropy", "result": "ok"}, 1)

	// The enclave fails to answer: up 0, its series absent, the rest served.
	stub.mu.Lock()
	stub.fn = func() (*pb.GetStatsResponse, error) { return nil, status.Error(codes.Unavailable, "down") }
	stub.mu.Unlock()
	f = scrape(t, url)
	want(t, f, "nitrosign_enclave_up", nil, 0)
	if _, ok := f["nitrosign_enclave_calls_total"]; ok {
		t.Error("enclave counters served from a failed scrape")
	}
	if _, ok := f["go_goroutines"]; !ok {
		t.Error("a failed enclave scrape hid the other metrics")
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		cfg  metrics.Config
		want string
	}{
		{metrics.Config{}, ""},
		{metrics.Config{Listen: "127.0.0.1:9464"}, ""},
		{metrics.Config{Listen: ":0"}, ""},
		{metrics.Config{Listen: "9464"}, "want HOST:PORT"},
		{metrics.Config{Listen: "127.0.0.1:99999"}, "port must be a number"},
		{metrics.Config{EnclaveScrapeTimeout: -time.Second}, "must be >= 0"},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("Validate(%+v) = %v, want %q", tt.cfg, err, tt.want)
		}
	}
}

func TestServerPaths(t *testing.T) {
	url := serve(t, metrics.New())
	base := strings.TrimSuffix(url, "/metrics")
	for path, code := range map[string]int{"/": 200, "/metrics": 200, "/nope": 404} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != code {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, code)
		}
	}
}

// The certificate expiry gauge reads the current NotAfter at each scrape.
func TestTLSCertExpiry(t *testing.T) {
	m := metrics.New()
	var mu sync.Mutex
	notAfter := time.Unix(1_900_000_000, 0)
	m.RegisterTLSCertExpiry(func() time.Time { mu.Lock(); defer mu.Unlock(); return notAfter })
	url := serve(t, m)
	want(t, scrape(t, url), "nitrosign_proxy_tls_cert_expiry_seconds", nil, 1_900_000_000)
	mu.Lock()
	notAfter = time.Unix(1_950_000_000, 0) // reloaded
	mu.Unlock()
	want(t, scrape(t, url), "nitrosign_proxy_tls_cert_expiry_seconds", nil, 1_950_000_000)
}
