package reliability_test

import (
	"context"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/proxy"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// cycles is how many kill/restart cycles a fault test runs: a few in CI,
// NITROSIGN_FAULT_CYCLES for a longer run.
func cycles(ci int) int {
	if n, err := strconv.Atoi(os.Getenv("NITROSIGN_FAULT_CYCLES")); err == nil && n > 0 {
		return n
	}
	return ci
}

// waitProgress waits until ok has grown by n.
func waitProgress(t *testing.T, st *loadStats, n int64, what string) {
	t.Helper()
	from := st.ok.Load()
	eventually(t, 30*time.Second, what, func() bool { return st.ok.Load() >= from+n })
}

// The enclave is killed (every connection reset at once) and restarted on
// its port, again and again, under load through the proxy: calls fail fast
// with Unavailable while it is down, none hangs past its deadline, none is
// answered wrongly, the same proxy serves again by itself after each
// restart, and goroutines and heap come back to their baseline.
func TestEnclaveKilledUnderLoad(t *testing.T) {
	log := testLogger(t, nil)
	e := startEnclave(t, enclaveConfig(nil), 0, log)
	port := e.port()
	p := startProxy(t, proxyConfig(e.target(), nil), 0, log)
	p.waitReady(t, 2)
	cc := dial(t, p.addr)
	if _, err := pb.NewEchoServiceClient(cc).Echo(callCtx(t), &pb.EchoRequest{}); err != nil {
		t.Fatal(err)
	}
	base := measure()

	stop := make(chan struct{})
	st := &loadStats{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runLoad(cc, loadOpts{workers: 8, deadline: 2 * time.Second, pause: 5 * time.Millisecond}, stop, st)
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-done
	}()

	n := cycles(5)
	for i := range n {
		waitProgress(t, st, 100, "calls to succeed")
		unavailable := st.count(codes.Unavailable)
		e.kill()
		eventually(t, 10*time.Second, "Unavailable while the enclave is down", func() bool {
			return st.count(codes.Unavailable) > unavailable
		})
		e = startEnclave(t, enclaveConfig(nil), port, log)
		waitProgress(t, st, 100, "the proxy to serve the restarted enclave")
		t.Logf("cycle %d/%d: %s", i+1, n, st)
	}
	close(stop)
	<-done
	t.Logf("after %d kills: %s", n, st)
	if st.wrong.Load() != 0 {
		t.Fatalf("%d calls answered wrongly (first: %v)", st.wrong.Load(), st.firstWrong.Load())
	}
	if st.overDeadline.Load() != 0 {
		t.Fatalf("%d calls hung past their deadline", st.overDeadline.Load())
	}
	if err := st.onlyCodes(codes.Unavailable, codes.DeadlineExceeded); err != nil {
		t.Fatal(err)
	}
	// Fail fast: while the enclave is down the proxy answers at once.
	if st.count(codes.DeadlineExceeded) > st.count(codes.Unavailable)/10 {
		t.Fatalf("calls did not fail fast: %s", st)
	}
	p.waitReady(t, 2)
	settles(t, "after the kills", base, 10, 2, 16<<20)
}

// The proxy is killed (every client connection reset) and restarted on its
// port under client load, and once stopped gracefully (SIGTERM): clients
// see Unavailable while it is away and are served again by the new process;
// nothing is answered wrongly, nothing hangs.
func TestProxyRestartUnderLoad(t *testing.T) {
	log := testLogger(t, nil)
	e := startEnclave(t, enclaveConfig(nil), 0, log)
	cfg := proxyConfig(e.target(), nil)
	p := startProxy(t, cfg, 0, log)
	port := p.port()
	p.waitReady(t, 2)
	cc := dial(t, p.addr)
	if _, err := pb.NewEchoServiceClient(cc).Echo(callCtx(t), &pb.EchoRequest{}); err != nil {
		t.Fatal(err)
	}
	base := measure()

	stop := make(chan struct{})
	st := &loadStats{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runLoad(cc, loadOpts{workers: 8, deadline: 2 * time.Second, pause: 5 * time.Millisecond}, stop, st)
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-done
	}()

	n := cycles(3)
	for i := range n + 1 {
		waitProgress(t, st, 100, "calls to succeed")
		failed := st.total() - st.ok.Load()
		if i < n {
			p.kill()
		} else {
			p.stop() // the last one is a graceful stop: calls in flight finish
		}
		eventually(t, 10*time.Second, "calls to fail while the proxy is away", func() bool { return st.total()-st.ok.Load() > failed })
		p = startProxy(t, cfg, port, log)
		p.waitReady(t, 2)
		waitProgress(t, st, 100, "the restarted proxy to serve")
		t.Logf("restart %d/%d: %s", i+1, n+1, st)
	}
	close(stop)
	<-done
	t.Logf("after %d restarts: %s", n+1, st)
	if st.wrong.Load() != 0 {
		t.Fatalf("%d calls answered wrongly (first: %v)", st.wrong.Load(), st.firstWrong.Load())
	}
	if st.overDeadline.Load() != 0 {
		t.Fatalf("%d calls hung past their deadline", st.overDeadline.Load())
	}
	if err := st.onlyCodes(codes.Unavailable, codes.DeadlineExceeded); err != nil {
		t.Fatal(err)
	}
	settles(t, "after the restarts", base, 10, 2, 16<<20)
}

// stallServer accepts connections and never answers a call: either it
// never reads or writes a byte, or it completes the HTTP/2 handshake (and
// answers pings, so keepalive does not save anyone) and then ignores every
// stream.
type stallServer struct {
	l         *killableListener
	handshake bool
	wg        sync.WaitGroup
}

func startStall(t *testing.T, port int, handshake bool) *stallServer {
	t.Helper()
	s := &stallServer{l: listenOn(t, port), handshake: handshake}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.l.Accept()
			if err != nil {
				return
			}
			if handshake {
				s.wg.Add(1)
				go s.h2(c)
			}
		}
	}()
	t.Cleanup(s.close)
	return s
}

func (s *stallServer) h2(c net.Conn) {
	defer s.wg.Done()
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c, preface); err != nil {
		return
	}
	fr := http2.NewFramer(c, c)
	if fr.WriteSettings() != nil {
		return
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() && fr.WriteSettingsAck() != nil {
				return
			}
		case *http2.PingFrame:
			if !f.IsAck() && fr.WritePing(true, f.Data) != nil {
				return
			}
		}
	}
}

func (s *stallServer) close() {
	s.l.kill()
	s.wg.Wait()
}

// A stalled upstream (accepts and never answers; or completes the HTTP/2
// handshake and never answers a call) behind the proxy: every call ends by
// its deadline, calls without one by the proxy's default deadline; when a
// real enclave takes the address, the proxy recovers by itself; goroutines
// and heap come back to their baseline.
func TestStalledUpstream(t *testing.T) {
	tests := []struct {
		name        string
		handshake   bool
		healthCheck bool
		// want is the code of a call while the upstream stalls.
		want codes.Code
	}{
		// The pool's connection never becomes READY: calls fail at once.
		{"accepts, never answers", false, true, codes.Unavailable},
		// The handshake completes but the health Watch is never
		// answered: the connection is not READY, calls fail at once.
		{"HTTP/2 handshake, never answers, health checked", true, true, codes.Unavailable},
		// Without health checking the connection is READY and calls are
		// forwarded into the void: they end at their deadline.
		{"HTTP/2 handshake, never answers, no health check", true, false, codes.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			log := testLogger(t, nil)
			base := measure()
			stall := startStall(t, 0, tt.handshake)
			port := portOf(stall.l)
			cfg := proxyConfig("tcp://127.0.0.1:"+strconv.Itoa(port), func(c *proxy.Config) {
				c.Pool.HealthCheck = tt.healthCheck
				c.Limits.DefaultCallTimeout = 500 * time.Millisecond
			})
			p := startProxy(t, cfg, 0, log)
			cc := dial(t, p.addr)
			echo := pb.NewEchoServiceClient(cc)
			if !tt.healthCheck {
				p.waitReady(t, 2) // READY on the handshake alone
			}
			first, cancelFirst := context.WithTimeout(context.Background(), time.Second)
			if _, err := echo.Echo(first, &pb.EchoRequest{}); status.Code(err) != tt.want {
				t.Fatalf("first call: %v, want %s", err, tt.want)
			}
			cancelFirst()
			stalled := measure()

			// Calls with a deadline end by it (+ a little for the hop).
			var wg sync.WaitGroup
			errs := make(chan error, 32)
			for range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					defer cancel()
					start := time.Now()
					_, err := echo.Echo(ctx, &pb.EchoRequest{Payload: []byte("stalled?")})
					if time.Since(start) > 3*time.Second {
						t.Errorf("a call with a 1s deadline took %s", time.Since(start))
					}
					errs <- err
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if status.Code(err) != tt.want {
					t.Fatalf("call to a stalled upstream: %v, want %s", err, tt.want)
				}
			}
			// A call without a deadline gets the proxy's default one.
			res := make(chan error, 1)
			go func() {
				_, err := echo.Echo(context.Background(), &pb.EchoRequest{})
				res <- err
			}()
			select {
			case err := <-res:
				if c := status.Code(err); c != tt.want {
					t.Fatalf("call without a deadline: %v, want %s", err, tt.want)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("a call without a deadline never ended: the proxy's default deadline did not apply")
			}
			// The stalled calls are over: their goroutines are gone.
			settles(t, "after the stalled calls ended", stalled, 10, 2, 16<<20)
			// The proxy's own health says NOT_SERVING when no connection
			// is READY; with a READY-but-stalled one it cannot know.
			if tt.healthCheck {
				resp, err := healthpb.NewHealthClient(cc).Check(callCtx(t), &healthpb.HealthCheckRequest{})
				if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
					t.Fatalf("proxy health with a stalled upstream: %v %v, want NOT_SERVING", resp, err)
				}
			}

			// A real enclave takes the address: the proxy recovers by itself.
			stall.close()
			enc := startEnclave(t, enclaveConfig(nil), port, log)
			eventually(t, 30*time.Second, "the proxy to serve the real enclave", func() bool {
				_, err := echo.Echo(callCtx(t), &pb.EchoRequest{})
				return err == nil
			})
			if _, err := pb.NewSignerServiceClient(cc).Sign(callCtx(t), &pb.SignRequest{Key: eccSel, Message: []byte("m")}); err != nil {
				t.Fatalf("Sign after recovery: %v", err)
			}
			p.stop()
			enc.stop()
			_ = cc.Close()
			settles(t, "after everything stopped", base, 5, 2, 16<<20)
		})
	}
}

// Overload: calls beyond --max-in-flight get ResourceExhausted at once and
// are counted; connections beyond --max-connections are closed at once and
// counted; health stays answerable; the proxy serves normally once the
// load is gone.
func TestProxySheds(t *testing.T) {
	log := testLogger(t, nil)
	stall := startStall(t, 0, true)
	port := portOf(stall.l)
	cfg := proxyConfig("tcp://127.0.0.1:"+strconv.Itoa(port), func(c *proxy.Config) {
		c.Pool.HealthCheck = false // READY on the handshake: calls hang upstream
		c.Limits.MaxInFlight = 8
		c.Limits.MaxConnections = 2
	})
	p := startProxy(t, cfg, 0, log)
	p.waitReady(t, 2)
	cc := dial(t, p.addr)
	echo := pb.NewEchoServiceClient(cc)

	// Eight calls hang on the stalled upstream and fill the proxy.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = echo.Echo(ctx, &pb.EchoRequest{})
		}()
	}
	eventually(t, 10*time.Second, "eight calls in flight", func() bool {
		return p.metric(t, "nitrosign_proxy_calls_in_flight", nil) >= 8
	})
	_, err := echo.Echo(callCtx(t), &pb.EchoRequest{})
	if status.Code(err) != codes.ResourceExhausted || status.Convert(err).Message() != "proxy busy: 8 calls in flight, limit 8; retry with backoff" {
		t.Fatalf("ninth call = %v, want ResourceExhausted proxy busy", err)
	}
	if v := p.metric(t, "nitrosign_proxy_shed_total", map[string]string{"reason": metrics.ShedMaxInFlight}); v != 1 {
		t.Fatalf("shed max_in_flight = %v, want 1", v)
	}
	if _, err := healthpb.NewHealthClient(cc).Check(callCtx(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health while shedding: %v", err)
	}

	// Connections: cc holds one; a second client fits; a third is closed.
	cc2 := dial(t, p.addr)
	if _, err := healthpb.NewHealthClient(cc2).Check(callCtx(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	cc3 := dial(t, p.addr)
	_, err = healthpb.NewHealthClient(cc3).Check(callCtx(t), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("third connection: %v, want Unavailable", err)
	}
	if v := p.metric(t, "nitrosign_proxy_shed_total", map[string]string{"reason": metrics.ShedMaxConnections}); v < 1 {
		t.Fatalf("shed max_connections = %v, want >= 1", v)
	}
	// Room again: the third client gets in by its own reconnect.
	_ = cc2.Close()
	eventually(t, 30*time.Second, "the third client to connect once there is room", func() bool {
		_, err := healthpb.NewHealthClient(cc3).Check(callCtx(t), &healthpb.HealthCheckRequest{})
		return err == nil
	})
	cancel()
	wg.Wait()
}
