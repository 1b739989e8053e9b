package reliability_test

import (
	"context"
	"net"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nitrosign/nitrosign/enclave"
	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/limits"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// killableListener remembers the connections it accepted so a test can
// cut them all at once, as a crash of the process would.
type killableListener struct {
	net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func (l *killableListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	if l.conns == nil {
		l.conns = map[net.Conn]struct{}{}
	}
	l.conns[c] = struct{}{}
	l.mu.Unlock()
	return c, nil
}

// kill closes the listener and resets every accepted connection (SO_LINGER
// 0: the peer gets a RST, as from a killed process).
func (l *killableListener) kill() {
	_ = l.Listener.Close()
	l.mu.Lock()
	defer l.mu.Unlock()
	for c := range l.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.Close()
	}
	l.conns = nil
}

// listenOn listens on 127.0.0.1:port (0: a free port), retrying briefly:
// a port just freed by a killed server may take a moment.
func listenOn(tb testing.TB, port int) *killableListener {
	tb.Helper()
	var err error
	for range 100 {
		var l net.Listener
		if l, err = net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err == nil {
			return &killableListener{Listener: l}
		}
		time.Sleep(20 * time.Millisecond)
	}
	tb.Fatalf("listen on port %d: %v", port, err)
	return nil
}

func portOf(l net.Listener) int { return l.Addr().(*net.TCPAddr).Port }

// testLogger logs at warn and above into the test log, or at level into
// core when core is not nil.
func testLogger(tb testing.TB, core zapcore.Core) *zap.Logger {
	if core != nil {
		return zap.New(core)
	}
	return zaptest.NewLogger(tb, zaptest.Level(zap.WarnLevel))
}

// enclaveProc is the real enclave graph (enclave.Options: signer,
// simulated NSM attestation, stats, server) on a TCP loopback listener.
type enclaveProc struct {
	app  *fx.App
	lis  *killableListener
	addr string
	once sync.Once
}

// enclaveConfig is enclavetest's fast configuration with mutate applied.
func enclaveConfig(mutate func(*limits.Config)) enclave.Config {
	c := enclavetest.DefaultConfig()
	if mutate != nil {
		mutate(&c.Server.Limits)
	}
	return c
}

// startEnclave runs the enclave graph on port (0: a free one) until the
// test ends or kill/stop is called.
func startEnclave(tb testing.TB, c enclave.Config, port int, log *zap.Logger) *enclaveProc {
	tb.Helper()
	l := listenOn(tb, port)
	app := fx.New(enclave.Options(c, log), fx.Supply(fx.Annotate(net.Listener(l), fx.As(new(net.Listener)))), fx.NopLogger)
	if err := app.Err(); err != nil {
		l.Close()
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := app.Start(ctx); err != nil {
		l.Close()
		tb.Fatal(err)
	}
	e := &enclaveProc{app: app, lis: l, addr: l.Addr().String()}
	tb.Cleanup(e.stop)
	return e
}

func (e *enclaveProc) target() string { return "tcp://" + e.addr }
func (e *enclaveProc) port() int      { return portOf(e.lis) }

// kill cuts every connection at once (the peer sees a reset, as from a
// crashed process) and then stops the graph.
func (e *enclaveProc) kill() {
	e.once.Do(func() {
		e.lis.kill()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = e.app.Stop(ctx)
	})
}

// stop drains gracefully (SIGTERM).
func (e *enclaveProc) stop() {
	e.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		_ = e.app.Stop(ctx)
	})
}

// proxyProc is the binary's proxy graph (proxy.Options) on a TCP loopback
// listener.
type proxyProc struct {
	app     *fx.App
	lis     *killableListener
	addr    string
	pool    *proxy.Upstreams
	metrics *metrics.Metrics
	px      *proxy.Proxy
	once    sync.Once
}

// proxyConfig is the proxy's default configuration for upstream with
// mutate applied.
func proxyConfig(upstream string, mutate func(*proxy.Config)) proxy.Config {
	c := proxy.DefaultConfig()
	c.Upstreams = []string{upstream}
	c.Listen = "127.0.0.1:0"
	c.Pool.Size = 2
	// A scrape in a test must not wait seconds on a stalled upstream.
	c.Metrics.EnclaveScrapeTimeout = 200 * time.Millisecond
	if mutate != nil {
		mutate(&c)
	}
	return c
}

// startProxy runs the proxy graph on port (0: a free one). It does not
// wait for the pool: a test of a dead upstream must not.
func startProxy(tb testing.TB, c proxy.Config, port int, log *zap.Logger) *proxyProc {
	tb.Helper()
	l := listenOn(tb, port)
	p := &proxyProc{lis: l, addr: l.Addr().String()}
	p.app = fx.New(proxy.Options(c),
		fx.Provide(func() net.Listener { return l }),
		fx.Decorate(func() *zap.Logger { return log }),
		fx.Populate(&p.pool, &p.metrics, &p.px),
		fx.NopLogger,
	)
	if err := p.app.Err(); err != nil {
		l.Close()
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.app.Start(ctx); err != nil {
		l.Close()
		tb.Fatal(err)
	}
	tb.Cleanup(p.stop)
	return p
}

func (p *proxyProc) port() int { return portOf(p.lis) }

// metric is the value of the proxy's metric name with labels (a gauge or
// a counter), read from its registry as a scrape would; absent fails.
func (p *proxyProc) metric(tb testing.TB, name string, labels map[string]string) float64 {
	tb.Helper()
	fams, err := p.metrics.Registry().Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue next
				}
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	tb.Fatalf("metric %s%v not found", name, labels)
	return 0
}

// waitReady waits until n pool connections are READY.
func (p *proxyProc) waitReady(tb testing.TB, n int) {
	tb.Helper()
	eventually(tb, 20*time.Second, "pool connections READY", func() bool { return p.pool.Ready() >= n })
}

func (p *proxyProc) kill() {
	p.once.Do(func() {
		p.lis.kill()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.app.Stop(ctx)
	})
}

func (p *proxyProc) stop() {
	p.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = p.app.Stop(ctx)
	})
}

// dial is a plain grpc-go client of addr, closed at test cleanup.
func dial(tb testing.TB, addr string, opts ...grpc.DialOption) *grpc.ClientConn {
	tb.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr,
		append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = cc.Close() })
	return cc
}

// callCtx is the context of one test call: every call has a deadline.
func callCtx(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

func eventually(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// baseline is a process's goroutine count and live heap at one moment.
type baseline struct {
	goroutines int
	heap       uint64 // HeapAlloc after two GCs
}

func measure() baseline {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return baseline{goroutines: runtime.NumGoroutine(), heap: ms.HeapAlloc}
}

// settles waits until the goroutine count is back within slack of base
// (connections and calls wind down asynchronously), and reports the heap
// growth against base as a ratio with an absolute allowance: memory checks
// compare live heap after GC, never timings.
func settles(tb testing.TB, what string, base baseline, goroutineSlack int, heapRatio float64, heapSlack uint64) baseline {
	tb.Helper()
	var now baseline
	deadline := time.Now().Add(20 * time.Second)
	for {
		now = measure()
		if now.goroutines <= base.goroutines+goroutineSlack {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			tb.Fatalf("%s: %d goroutines, baseline %d (+%d allowed)\n%s", what, now.goroutines, base.goroutines, goroutineSlack, buf[:n])
		}
		time.Sleep(50 * time.Millisecond)
	}
	limit := uint64(float64(base.heap)*heapRatio) + heapSlack
	tb.Logf("%s: goroutines %d (baseline %d), live heap %.1f MiB (baseline %.1f MiB, limit %.1f MiB)",
		what, now.goroutines, base.goroutines, mib(now.heap), mib(base.heap), mib(limit))
	if now.heap > limit {
		tb.Fatalf("%s: live heap %.1f MiB, baseline %.1f MiB: over %.1f MiB", what, mib(now.heap), mib(base.heap), mib(limit))
	}
	return now
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }
