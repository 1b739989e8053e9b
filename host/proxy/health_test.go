package proxy_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/proxy"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

const (
	servingStatus    = healthpb.HealthCheckResponse_SERVING
	notServingStatus = healthpb.HealthCheckResponse_NOT_SERVING
	signerService    = "nitrosign.v1.SignerService"
)

type healthClient struct{ healthpb.HealthClient }

func newHealthClient(cc grpc.ClientConnInterface) healthClient {
	return healthClient{healthpb.NewHealthClient(cc)}
}

// waitStatus polls Check until service reports want.
func (c healthClient) waitStatus(t *testing.T, service string, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := c.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		cancel()
		if err == nil && resp.GetStatus() == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("health %q: got %v (err %v), want %v", service, resp.GetStatus(), err, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// recvStatus reads the next Watch update, failing on error.
func recvStatus(t *testing.T, w healthpb.Health_WatchClient) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	resp, err := w.Recv()
	if err != nil {
		t.Fatalf("Watch Recv: %v", err)
	}
	return resp.GetStatus()
}

func TestHealthCheck(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	hc := newHealthClient(h.cc)
	tests := []struct {
		name     string
		upstream map[string]healthpb.HealthCheckResponse_ServingStatus // set on the enclave first
		service  string
		want     healthpb.HealthCheckResponse_ServingStatus
		wantCode codes.Code
	}{
		{"proxy itself", nil, "", servingStatus, codes.OK},
		{"enclave service serving", map[string]healthpb.HealthCheckResponse_ServingStatus{signerService: servingStatus}, signerService, servingStatus, codes.OK},
		{"enclave service not serving", map[string]healthpb.HealthCheckResponse_ServingStatus{signerService: notServingStatus}, signerService, notServingStatus, codes.OK},
		{"proxy serves while an enclave service does not", nil, "", servingStatus, codes.OK},
		{"unknown service is the enclave's NotFound", nil, "no.such.Service", 0, codes.NotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for svc, st := range tt.upstream {
				h.up.Health.SetServingStatus(svc, st)
			}
			resp, err := hc.Check(callCtx(t), &healthpb.HealthCheckRequest{Service: tt.service})
			if status.Code(err) != tt.wantCode {
				t.Fatalf("Check(%q) = %v, want %v", tt.service, err, tt.wantCode)
			}
			if err == nil && resp.GetStatus() != tt.want {
				t.Fatalf("Check(%q) = %v, want %v", tt.service, resp.GetStatus(), tt.want)
			}
		})
	}
}

// Watch "" follows the pool: the enclave reporting NOT_SERVING empties the
// pool of READY connections, and the proxy follows.
func TestHealthWatchLocal(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	w, err := newHealthClient(h.cc).Watch(callCtx(t), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st := recvStatus(t, w); st != servingStatus {
		t.Fatalf("first status %v, want SERVING", st)
	}
	h.up.Health.SetServingStatus("", notServingStatus)
	if st := recvStatus(t, w); st != notServingStatus {
		t.Fatalf("status %v, want NOT_SERVING", st)
	}
	h.up.Health.SetServingStatus("", servingStatus)
	if st := recvStatus(t, w); st != servingStatus {
		t.Fatalf("status %v, want SERVING again", st)
	}
}

func TestHealthWatchForwarded(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	h.up.Health.SetServingStatus(signerService, servingStatus)
	w, err := newHealthClient(h.cc).Watch(callCtx(t), &healthpb.HealthCheckRequest{Service: signerService})
	if err != nil {
		t.Fatal(err)
	}
	if st := recvStatus(t, w); st != servingStatus {
		t.Fatalf("first status %v, want SERVING", st)
	}
	h.up.Health.SetServingStatus(signerService, notServingStatus)
	if st := recvStatus(t, w); st != notServingStatus {
		t.Fatalf("status %v, want NOT_SERVING", st)
	}
}

func TestHealthList(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	h.up.Health.SetServingStatus(signerService, notServingStatus)
	hc := newHealthClient(h.cc)

	resp, err := hc.List(callCtx(t), &healthpb.HealthListRequest{})
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if got := resp.GetStatuses()[""].GetStatus(); got != servingStatus {
		t.Errorf(`List[""] = %v, want the proxy's SERVING`, got)
	}
	if got := resp.GetStatuses()[signerService].GetStatus(); got != notServingStatus {
		t.Errorf("List[%s] = %v, want the enclave's NOT_SERVING", signerService, got)
	}

	h.up.Stop()
	hc.waitStatus(t, "", notServingStatus)
	resp, err = hc.List(callCtx(t), &healthpb.HealthListRequest{})
	if err != nil {
		t.Fatalf("List with enclave down: %v", err)
	}
	if len(resp.GetStatuses()) != 1 || resp.GetStatuses()[""].GetStatus() != notServingStatus {
		t.Errorf("List with enclave down = %v, want only \"\" NOT_SERVING", resp.GetStatuses())
	}
}

// Stop: health turns NOT_SERVING and watches end, the call in flight
// finishes, and Stop does not wait for the (long) graceful timeout.
func TestStopDrains(t *testing.T) {
	h := newHarness(t, harnessOpts{mutate: func(c *proxy.Config) { c.GracefulStopTimeout = time.Minute }})
	h.up.Health.SetServingStatus(signerService, servingStatus)
	hc := newHealthClient(h.cc)
	local, err := hc.Watch(callCtx(t), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st := recvStatus(t, local); st != servingStatus {
		t.Fatalf("local watch %v, want SERVING", st)
	}
	fwd, err := hc.Watch(callCtx(t), &healthpb.HealthCheckRequest{Service: signerService})
	if err != nil {
		t.Fatal(err)
	}
	if st := recvStatus(t, fwd); st != servingStatus {
		t.Fatalf("forwarded watch %v, want SERVING", st)
	}

	entered, release := make(chan struct{}), make(chan struct{})
	h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
		close(entered)
		<-release
		return &nitrosignv1.EchoResponse{Payload: req.GetPayload()}, nil
	})
	inflight := make(chan error, 1)
	go func() {
		_, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(callCtx(t), &nitrosignv1.EchoRequest{Payload: []byte("in flight")})
		inflight <- err
	}()
	<-entered

	stopped := make(chan struct{})
	go func() {
		h.stop()
		close(stopped)
	}()

	if st := recvStatus(t, local); st != notServingStatus {
		t.Fatalf("local watch during stop %v, want NOT_SERVING", st)
	}
	if _, err := local.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("local watch end = %v, want Unavailable", err)
	}
	if _, err := fwd.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("forwarded watch end = %v, want Unavailable", err)
	}
	select {
	case <-stopped:
		t.Fatal("Stop returned while a call was in flight")
	default:
	}
	close(release)
	if err := <-inflight; err != nil {
		t.Fatalf("call in flight during graceful stop: %v", err)
	}
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop did not return once the last call finished")
	}
}

func TestStopCutsAfterTimeout(t *testing.T) {
	h := newHarness(t, harnessOpts{mutate: func(c *proxy.Config) { c.GracefulStopTimeout = 200 * time.Millisecond }})
	entered := make(chan struct{})
	h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
		close(entered)
		<-ctx.Done() // only the proxy cutting the call ends it
		return nil, ctx.Err()
	})
	inflight := make(chan error, 1)
	go func() {
		_, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(callCtx(t), &nitrosignv1.EchoRequest{})
		inflight <- err
	}()
	<-entered
	h.stop()
	if err := <-inflight; status.Code(err) != codes.Unavailable {
		t.Fatalf("call cut by stop = %v, want Unavailable", err)
	}
}
