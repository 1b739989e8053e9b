package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/metrics/metricstest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// long selects the longer fault runs (NITROSIGN_E2E_LONG=1): many more
// kill and restart cycles than CI's few.
var long = os.Getenv("NITROSIGN_E2E_LONG") == "1"

func faultCycles(ci, longRun int) int {
	if long {
		return longRun
	}
	return ci
}

// goroutines reads the proxy's go_goroutines from its /metrics.
func goroutines(t *testing.T, metricsAddr string) float64 {
	t.Helper()
	f, text, err := metricstest.Scrape(callCtx(t), "http://"+metricsAddr+"/metrics")
	if err != nil {
		t.Fatalf("scrape: %v\n%s", err, text)
	}
	v, ok := f.Value("go_goroutines", nil)
	if !ok {
		t.Fatal("no go_goroutines in the proxy's metrics")
	}
	return v
}

// checkLoad fails the test unless every failed call was Unavailable or
// DeadlineExceeded, none hung, none was answered wrongly, and most failed
// fast (Unavailable).
func checkLoad(t *testing.T, res *loadResult) {
	t.Helper()
	t.Logf("result: %s", res)
	if res.wrong.Load() != 0 {
		t.Fatalf("%d calls answered wrongly (first: %v)", res.wrong.Load(), res.firstWrongErr.Load())
	}
	if res.overDeadline.Load() != 0 {
		t.Fatalf("%d calls hung past their deadline", res.overDeadline.Load())
	}
	res.codes.Range(func(k, v any) bool {
		if code := k.(codes.Code); code != codes.Unavailable && code != codes.DeadlineExceeded {
			t.Errorf("%d calls failed with %s", v.(*atomic.Int64).Load(), code)
		}
		return true
	})
	if n := res.count(codes.DeadlineExceeded); n > res.count(codes.Unavailable)/5+5 {
		t.Fatalf("calls did not fail fast: %d DeadlineExceeded against %d Unavailable", n, res.count(codes.Unavailable))
	}
}

// Fault injection over real vsock: the enclave process is SIGKILLed and
// restarted on its port again and again under load through one proxy
// process. Each time calls fail fast, the proxy serves the new enclave by
// itself, nothing is answered wrongly or hangs, and the proxy's goroutines
// come back to their level before the load.
func TestEnclaveKilledRepeatedly(t *testing.T) {
	port := vsockPort()
	e := startEnclave(t, port)
	metricsAddr := tcpAddr(t)
	p := startProxy(t, e.target, 2, "--metrics-listen", metricsAddr)
	c := dial(t, p.target, 2)
	before := goroutines(t, metricsAddr)

	stop := make(chan struct{})
	res := &loadResult{}
	wg := signLoad(c, 8, 2*time.Second*scale, stop, res, pb.KeyType_KEY_TYPE_ECC)
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			wg.Wait()
		}
	}()
	n := faultCycles(3, 20)
	for i := range n {
		okBefore := res.ok.Load()
		waitFor(t, "calls to succeed", 20*time.Second*scale, func() bool { return res.ok.Load() > okBefore+30 })
		unavailable := res.count(codes.Unavailable)
		e.kill()
		waitFor(t, "Unavailable while the enclave is down", 10*time.Second*scale, func() bool { return res.count(codes.Unavailable) > unavailable })
		e = startEnclave(t, port)
		okRestart := res.ok.Load()
		waitFor(t, "the proxy to serve the restarted enclave", 20*time.Second*scale, func() bool { return res.ok.Load() > okRestart+30 })
		t.Logf("cycle %d/%d: %s", i+1, n, res)
	}
	close(stop)
	wg.Wait()
	stopped = true
	checkLoad(t, res)
	waitFor(t, "the proxy's goroutines back to their level before the load", 20*time.Second*scale, func() bool {
		return goroutines(t, metricsAddr) <= before+10
	})
	t.Logf("proxy goroutines: %v before the load, %v after %d kills", before, goroutines(t, metricsAddr), n)
}

// The proxy process is SIGKILLed and restarted on its address under client
// load: clients see Unavailable while it is away and are served by the new
// process through their own reconnects; nothing is answered wrongly.
func TestProxyKilledUnderLoad(t *testing.T) {
	e := startEnclave(t, vsockPort())
	addr := tcpAddr(t)
	startAt := func() *proc {
		p := start(t, "nitrosign-proxy", "--listen", addr, "--upstream", e.target, "--pool-size", "2")
		waitServing(t, "tcp://"+addr, p)
		return p
	}
	p := startAt()
	c := dial(t, "tcp://"+addr, 2)
	stop := make(chan struct{})
	res := &loadResult{}
	wg := signLoad(c, 8, 2*time.Second*scale, stop, res, pb.KeyType_KEY_TYPE_ECC)
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			wg.Wait()
		}
	}()
	n := faultCycles(2, 10)
	for i := range n {
		okBefore := res.ok.Load()
		waitFor(t, "calls to succeed", 20*time.Second*scale, func() bool { return res.ok.Load() > okBefore+30 })
		unavailable := res.count(codes.Unavailable)
		p.kill()
		waitFor(t, "Unavailable while the proxy is away", 10*time.Second*scale, func() bool { return res.count(codes.Unavailable) > unavailable })
		p = startAt()
		okRestart := res.ok.Load()
		waitFor(t, "clients to be served by the new proxy", 20*time.Second*scale, func() bool { return res.ok.Load() > okRestart+30 })
		t.Logf("restart %d/%d: %s", i+1, n, res)
	}
	close(stop)
	wg.Wait()
	stopped = true
	checkLoad(t, res)
}

// vsockStall listens on vsock loopback and never answers a call: it either
// never reads or writes, or completes the HTTP/2 handshake (and answers
// pings) and then ignores every stream.
type vsockStall struct {
	l     net.Listener
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func startVsockStall(t *testing.T, port uint32, handshake bool) *vsockStall {
	t.Helper()
	l, err := vsock.ListenContextID(vsock.Local, port, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &vsockStall{l: l}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			if handshake {
				s.wg.Add(1)
				go func() {
					defer s.wg.Done()
					serveSilentHTTP2(c)
				}()
			}
		}
	}()
	t.Cleanup(s.close)
	return s
}

func serveSilentHTTP2(c net.Conn) {
	if _, err := io.ReadFull(c, make([]byte, len(http2.ClientPreface))); err != nil {
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

func (s *vsockStall) close() {
	_ = s.l.Close()
	s.mu.Lock()
	for _, c := range s.conns {
		_ = c.Close()
	}
	s.conns = nil
	s.mu.Unlock()
	s.wg.Wait()
}

// A stalled upstream over vsock (accepts and never answers; completes the
// HTTP/2 handshake and never answers a call) behind the proxy process:
// every call ends by its deadline, a call without one too (the proxy's
// health-checked pool never counts a silent enclave as ready, so it answers
// Unavailable at once), the proxy's health is NOT_SERVING; when the real
// enclave takes the port, the proxy serves it by itself.
func TestStalledUpstreamOverVsock(t *testing.T) {
	for _, handshake := range []bool{false, true} {
		t.Run(fmt.Sprintf("handshake=%v", handshake), func(t *testing.T) {
			port := vsockPort()
			stall := startVsockStall(t, port, handshake)
			addr := tcpAddr(t)
			// The proxy reports SERVING only with a ready connection: do
			// not wait for it.
			p := start(t, "nitrosign-proxy", "--listen", addr, "--upstream", fmt.Sprintf("vsock://1:%d", port),
				"--pool-size", "2", "--default-timeout", "3s")
			waitFor(t, "the proxy to listen", 20*time.Second*scale, func() bool {
				conn, err := net.Dial("tcp", addr)
				if err == nil {
					conn.Close()
				}
				return err == nil
			})
			_ = p
			cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			c := struct {
				echo   pb.EchoServiceClient
				health healthpb.HealthClient
			}{pb.NewEchoServiceClient(cc), healthpb.NewHealthClient(cc)}
			deadline := 2 * time.Second * scale
			for i := range 4 {
				ctx, cancel := context.WithTimeout(context.Background(), deadline)
				start := time.Now()
				_, err := c.echo.Echo(ctx, &pb.EchoRequest{Payload: []byte("stalled?")})
				cancel()
				// The health-checked pool never counts a silent enclave
				// as ready: the proxy answers at once.
				if status.Code(err) != codes.Unavailable {
					t.Fatalf("call %d to a stalled upstream: %v, want Unavailable", i, err)
				}
				if time.Since(start) > deadline+2*time.Second*scale {
					t.Fatalf("call %d took %s with a %s deadline", i, time.Since(start), deadline)
				}
			}
			done := make(chan error, 1)
			go func() {
				_, err := c.echo.Echo(context.Background(), &pb.EchoRequest{})
				done <- err
			}()
			select {
			case err := <-done:
				if status.Code(err) != codes.Unavailable {
					t.Fatalf("call without a deadline: %v, want Unavailable", err)
				}
			case <-time.After(30 * time.Second * scale):
				t.Fatal("a call without a deadline never ended")
			}
			resp, err := c.health.Check(callCtx(t), &healthpb.HealthCheckRequest{})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
				t.Fatalf("proxy health with a stalled upstream: %v %v, want NOT_SERVING", resp, err)
			}
			stall.close()
			startEnclave(t, port)
			waitFor(t, "the proxy to serve the real enclave", 30*time.Second*scale, func() bool {
				_, err := c.echo.Echo(callCtx(t), &pb.EchoRequest{})
				return err == nil
			})
		})
	}
}
