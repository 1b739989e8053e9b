package pool_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/pool"
	"github.com/nitrosign/nitrosign/host/pool/pooltest"
	"github.com/nitrosign/nitrosign/internal/target"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// newPool connects a pool of size to u; it is closed in t.Cleanup.
func newPool(t *testing.T, tgt target.Target, size int, mutate ...func(*pool.Config)) *pool.Pool {
	t.Helper()
	cfg := pool.DefaultConfig()
	cfg.Size = size
	for _, m := range mutate {
		m(&cfg)
	}
	p, err := pool.New(tgt, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("pool.New: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitAllReady(t *testing.T, p *pool.Pool) {
	t.Helper()
	eventually(t, 10*time.Second, "all connections READY", func() bool { return p.Ready() == p.Size() })
}

func echo(t *testing.T, p *pool.Pool, timeout time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err := nitrosignv1.NewEchoServiceClient(p).Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("ping")})
	return err
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*pool.Config)
		wantErr string
	}{
		{"defaults", func(*pool.Config) {}, ""},
		{"size zero", func(c *pool.Config) { c.Size = 0 }, "pool size 0: must be between 1 and 256"},
		{"size too big", func(c *pool.Config) { c.Size = 1000 }, "pool size 1000"},
		{"backoff base", func(c *pool.Config) { c.BackoffBase = 0 }, "backoff base 0s: must be > 0"},
		{"backoff max below base", func(c *pool.Config) { c.BackoffMax = time.Millisecond }, "backoff max 1ms: must be >= backoff base 50ms"},
		{"multiplier", func(c *pool.Config) { c.BackoffMultiplier = 0.5 }, "multiplier 0.5"},
		{"jitter", func(c *pool.Config) { c.BackoffJitter = 2 }, "jitter 2"},
		{"connect timeout", func(c *pool.Config) { c.ConnectTimeout = 0 }, "connect timeout 0s"},
		{"keepalive negative", func(c *pool.Config) { c.KeepaliveTime = -1 }, "keepalive time -1ns"},
		{"keepalive off", func(c *pool.Config) { c.KeepaliveTime, c.KeepaliveTimeout = 0, 0 }, ""},
		{"keepalive timeout", func(c *pool.Config) { c.KeepaliveTimeout = 0 }, "keepalive timeout 0s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := pool.DefaultConfig()
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

func TestNewRejects(t *testing.T) {
	tests := []struct {
		name string
		tgt  target.Target
		cfg  pool.Config
		want string
	}{
		{"bad config", target.Target{Scheme: target.TCP, HostPort: "127.0.0.1:1"}, pool.Config{}, "pool config"},
		{"empty target", target.Target{}, pool.DefaultConfig(), "empty target"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := pool.New(tt.tgt, tt.cfg, zap.NewNop())
			if err == nil {
				_ = p.Close()
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New error %q, want it to contain %q", err, tt.want)
			}
		})
	}
}

// With no concurrency every connection is equally idle, so the tie-break
// alone must spread calls perfectly evenly.
func TestSequentialCallsRoundRobin(t *testing.T) {
	u := pooltest.Start(t)
	p := newPool(t, u.Target(), 4)
	waitAllReady(t, p)
	const calls = 40
	for range calls {
		if err := echo(t, p, 5*time.Second); err != nil {
			t.Fatalf("Echo: %v", err)
		}
	}
	for _, s := range p.Stats() {
		if s.Calls != calls/4 || s.InFlight != 0 {
			t.Errorf("conn %d: calls %d in flight %d, want %d and 0", s.Index, s.Calls, s.InFlight, calls/4)
		}
	}
	peers := u.Peers()
	if len(peers) != 4 {
		t.Fatalf("upstream saw %d client connections, want 4: %v", len(peers), peers)
	}
	for addr, n := range peers {
		if n != calls/4 {
			t.Errorf("upstream peer %s got %d calls, want %d", addr, n, calls/4)
		}
	}
}

func TestConcurrentCallsSpread(t *testing.T) {
	u := pooltest.Start(t)
	// A small service time makes calls overlap, so the least-loaded choice
	// is exercised, not only the tie-break.
	u.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
		time.Sleep(time.Millisecond)
		return &nitrosignv1.EchoResponse{Payload: req.GetPayload()}, nil
	})
	const size, callers, perCaller = 4, 64, 20
	p := newPool(t, u.Target(), size)
	waitAllReady(t, p)

	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perCaller {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := nitrosignv1.NewEchoServiceClient(p).Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("x")})
				cancel()
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Echo: %v", err)
	}
	const total = callers * perCaller
	var sum uint64
	for _, s := range p.Stats() {
		sum += s.Calls
		// A fair share: at least half of an even split.
		if s.Calls < total/size/2 {
			t.Errorf("conn %d got %d of %d calls, want at least %d", s.Index, s.Calls, total, total/size/2)
		}
		if s.InFlight != 0 {
			t.Errorf("conn %d: %d still in flight", s.Index, s.InFlight)
		}
	}
	if sum != total {
		t.Errorf("stats count %d calls, want %d", sum, total)
	}
	if peers := u.Peers(); len(peers) != size {
		t.Errorf("upstream saw %d client connections, want %d", len(peers), size)
	}
}

// Open streams stay in flight; new ones go to the connection with fewest.
func TestLeastLoadedAndStreamRelease(t *testing.T) {
	u := pooltest.Start(t)
	blocked := make(chan struct{}, 16)
	u.Test.FullDuplexCallF.Set(func(stream testpb.TestService_FullDuplexCallServer) error {
		blocked <- struct{}{}
		<-stream.Context().Done()
		return stream.Context().Err()
	})
	p := newPool(t, u.Target(), 4)
	waitAllReady(t, p)
	client := testpb.NewTestServiceClient(p)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var cancels []context.CancelFunc
	open := func(n int) {
		t.Helper()
		for range n {
			sctx, scancel := context.WithCancel(ctx)
			cancels = append(cancels, scancel)
			if _, err := client.FullDuplexCall(sctx); err != nil {
				t.Fatalf("FullDuplexCall: %v", err)
			}
			select {
			case <-blocked:
			case <-ctx.Done():
				t.Fatal("stream did not reach the upstream")
			}
		}
	}
	wantInFlight := func(want int64) {
		t.Helper()
		for _, s := range p.Stats() {
			if s.InFlight != want {
				t.Fatalf("conn %d in flight %d, want %d (stats %+v)", s.Index, s.InFlight, want, p.Stats())
			}
		}
	}
	open(4)
	wantInFlight(1)
	open(4)
	wantInFlight(2)

	// Cancelling the context releases a stream nobody reads from.
	for _, c := range cancels {
		c()
	}
	eventually(t, 5*time.Second, "in-flight back to 0 after cancel", func() bool {
		for _, s := range p.Stats() {
			if s.InFlight != 0 {
				return false
			}
		}
		return true
	})
}

func TestStreamReleasedOnEnd(t *testing.T) {
	u := pooltest.Start(t)
	p := newPool(t, u.Target(), 1)
	waitAllReady(t, p)
	client := testpb.NewTestServiceClient(p)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	inFlight := func() int64 { return p.Stats()[0].InFlight }

	tests := []struct {
		name string
		run  func() error
	}{
		{"server streaming read to EOF", func() error {
			s, err := client.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{
				ResponseParameters: []*testpb.ResponseParameters{{Size: 1}, {Size: 2}, {Size: 3}},
			})
			if err != nil {
				return err
			}
			for {
				if _, err := s.Recv(); errors.Is(err, io.EOF) {
					return nil
				} else if err != nil {
					return err
				}
			}
		}},
		{"client streaming", func() error {
			s, err := client.StreamingInputCall(ctx)
			if err != nil {
				return err
			}
			for range 3 {
				if err := s.Send(&testpb.StreamingInputCallRequest{Payload: &testpb.Payload{Body: []byte("ab")}}); err != nil {
					return err
				}
			}
			resp, err := s.CloseAndRecv()
			if err != nil {
				return err
			}
			if resp.GetAggregatedPayloadSize() != 6 {
				t.Errorf("aggregated %d, want 6", resp.GetAggregatedPayloadSize())
			}
			return nil
		}},
		{"server streaming error status", func() error {
			s, err := client.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{
				ResponseStatus: &testpb.EchoStatus{Code: int32(codes.FailedPrecondition), Message: "nope"},
			})
			if err != nil {
				return err
			}
			if _, err := s.Recv(); status.Code(err) != codes.FailedPrecondition {
				t.Errorf("Recv = %v, want FailedPrecondition", err)
			}
			return nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.run(); err != nil {
				t.Fatal(err)
			}
			// Released synchronously by RecvMsg: no polling.
			if n := inFlight(); n != 0 {
				t.Fatalf("in flight %d after the stream ended, want 0", n)
			}
		})
	}
}

func TestUpstreamStopFailsFastAndRestartRecovers(t *testing.T) {
	u := pooltest.Start(t)
	p := newPool(t, u.Target(), 4)
	waitAllReady(t, p)

	readies := make(chan int, 64)
	p.OnStateChange(func(n int) { readies <- n })
	if n := <-readies; n != 4 {
		t.Fatalf("OnStateChange first value %d, want 4", n)
	}

	u.Stop()
	// Calls right after the stop must fail with Unavailable, not hang: a
	// 1s deadline would turn a hang into DeadlineExceeded.
	for i := range 8 {
		if err := echo(t, p, time.Second); status.Code(err) != codes.Unavailable {
			t.Fatalf("call %d after stop: %v, want Unavailable", i, err)
		}
	}
	eventually(t, 5*time.Second, "no READY connection", func() bool { return p.Ready() == 0 })
	err := echo(t, p, time.Second)
	if status.Code(err) != codes.Unavailable || !errors.Is(err, pool.ErrNoReadyConn) {
		t.Fatalf("call with none ready: %v, want Unavailable wrapping ErrNoReadyConn", err)
	}
	if want := "no ready upstream connection to tcp://" + u.Addr() + ": enclave down or not serving"; status.Convert(err).Message() != want {
		t.Errorf("message %q, want %q", status.Convert(err).Message(), want)
	}

	u.Restart()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitReady(ctx); err != nil {
		t.Fatalf("WaitReady after restart: %v", err)
	}
	if err := echo(t, p, 5*time.Second); err != nil {
		t.Fatalf("Echo after restart: %v", err)
	}
	waitAllReady(t, p)
	for _, s := range p.Stats() {
		if s.Readies < 2 {
			t.Errorf("conn %d became READY %d times, want >= 2", s.Index, s.Readies)
		}
	}
	// The subscriber saw the count fall to 0 and come back to 4. Ready()
	// reads the states directly, so the callback may trail it a little.
	var seen []int
	eventually(t, 5*time.Second, "OnStateChange reporting 4", func() bool {
		for len(readies) > 0 {
			seen = append(seen, <-readies)
		}
		return len(seen) > 0 && seen[len(seen)-1] == 4
	})
	if !containsInt(seen, 0) {
		t.Errorf("OnStateChange values %v, want a 0 on the way", seen)
	}
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func TestHealth(t *testing.T) {
	tests := []struct {
		name        string
		healthCheck bool
		wantReady   int // after NOT_SERVING
	}{
		{"health check on: NOT_SERVING means not ready", true, 0},
		{"health check off: NOT_SERVING ignored", false, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := pooltest.Start(t)
			p := newPool(t, u.Target(), 2, func(c *pool.Config) { c.HealthCheck = tt.healthCheck })
			waitAllReady(t, p)

			u.Health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
			if tt.wantReady == 0 {
				eventually(t, 5*time.Second, "connections not ready", func() bool { return p.Ready() == 0 })
				if err := echo(t, p, time.Second); status.Code(err) != codes.Unavailable {
					t.Fatalf("call while NOT_SERVING: %v, want Unavailable", err)
				}
			} else {
				// Nothing to wait for; give a broken implementation a chance to fail.
				time.Sleep(100 * time.Millisecond)
				if got := p.Ready(); got != tt.wantReady {
					t.Fatalf("Ready = %d, want %d", got, tt.wantReady)
				}
			}
			u.Health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			waitAllReady(t, p)
			if err := echo(t, p, 5*time.Second); err != nil {
				t.Fatalf("Echo after SERVING: %v", err)
			}
		})
	}
}

func TestNoUpstream(t *testing.T) {
	// A port that was just free: nothing listens there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	p := newPool(t, target.Target{Scheme: target.TCP, HostPort: addr}, 2)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := p.WaitReady(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitReady = %v, want DeadlineExceeded", err)
	}
	if err := echo(t, p, time.Second); status.Code(err) != codes.Unavailable {
		t.Fatalf("Echo = %v, want Unavailable", err)
	}
	sctx, scancel := context.WithTimeout(context.Background(), time.Second)
	defer scancel()
	if _, err := testpb.NewTestServiceClient(p).FullDuplexCall(sctx); status.Code(err) != codes.Unavailable {
		t.Fatalf("NewStream = %v, want Unavailable", err)
	}
}

func TestClose(t *testing.T) {
	u := pooltest.Start(t)
	p := newPool(t, u.Target(), 2)
	waitAllReady(t, p)
	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	err := echo(t, p, time.Second)
	if status.Code(err) != codes.Unavailable || !errors.Is(err, pool.ErrClosed) {
		t.Fatalf("Echo after Close = %v, want Unavailable wrapping ErrClosed", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := p.WaitReady(ctx); !errors.Is(err, pool.ErrClosed) {
		t.Fatalf("WaitReady after Close = %v, want ErrClosed", err)
	}
	if p.Ready() != 0 {
		t.Fatalf("Ready after Close = %d", p.Ready())
	}
}

// Stats count every dial: the first, the failed redials while the upstream
// is down, and the one that reconnects.
func TestDialCounts(t *testing.T) {
	u := pooltest.Start(t)
	p := newPool(t, u.Target(), 1)
	waitAllReady(t, p)
	if s := p.Stats()[0]; s.Dials != 1 || s.DialErrors != 0 || s.Readies != 1 {
		t.Fatalf("after start: %+v, want 1 dial, 0 errors, 1 ready", s)
	}
	u.Stop()
	eventually(t, 10*time.Second, "a failed redial", func() bool { return p.Stats()[0].DialErrors >= 1 })
	u.Restart()
	waitAllReady(t, p)
	s := p.Stats()[0]
	if s.Readies != 2 || s.Dials < 3 || s.Dials-s.DialErrors != 2 {
		t.Fatalf("after restart: %+v, want 2 readies and 2 successful dials of at least 3", s)
	}
}
