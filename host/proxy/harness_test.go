package proxy_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"

	"github.com/nitrosign/nitrosign/host/pool/pooltest"
	"github.com/nitrosign/nitrosign/host/proxy"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// harnessOpts tunes newHarness; the zero value is a 4-connection pool.
type harnessOpts struct {
	poolSize int
	upOpts   []grpc.ServerOption // upstream server
	mutate   func(*proxy.Config)
	log      *zap.Logger
	// proxyOpts are more options for proxy.New (an observer).
	proxyOpts []proxy.Option
	// clientOpts replace the plaintext credentials of h.cc (TLS tests).
	clientOpts []grpc.DialOption
}

// harness is upstream <- pool <- proxy <- client, all on TCP loopback.
type harness struct {
	up     *pooltest.Upstream
	pool   *proxy.Upstreams
	proxy  *proxy.Proxy
	cc     *grpc.ClientConn // a client of the proxy
	addr   string           // the proxy's address
	served chan error       // Serve's result
	stop   func()           // stops the proxy (idempotent), checks Serve's result
}

func newHarness(t testing.TB, o harnessOpts) *harness {
	t.Helper()
	if o.poolSize == 0 {
		o.poolSize = 4
	}
	if o.log == nil {
		o.log = zaptest.NewLogger(t)
	}
	h := &harness{up: pooltest.Start(t, o.upOpts...)}

	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{h.up.Target().String()}
	cfg.Listen = "127.0.0.1:0"
	cfg.Pool.Size = o.poolSize
	if o.mutate != nil {
		o.mutate(&cfg)
	}
	var err error
	h.pool, err = proxy.NewUpstreams(cfg, o.log)
	if err != nil {
		t.Fatalf("pool.New: %v", err)
	}
	h.proxy, err = proxy.New(cfg, h.pool, o.log, o.proxyOpts...)
	if err != nil {
		_ = h.pool.Close()
		t.Fatalf("proxy.New: %v", err)
	}
	l, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	h.addr = l.Addr().String()
	h.served = make(chan error, 1)
	go func() { h.served <- h.proxy.Serve(l) }()
	var once sync.Once
	h.stop = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			if err := h.proxy.Stop(ctx); err != nil {
				t.Errorf("Stop: %v", err)
			}
			if err := <-h.served; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	t.Cleanup(h.stop)

	h.cc = dialProxy(t, h.addr, o.clientOpts...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.pool.WaitReady(ctx); err != nil {
		t.Fatalf("pool never ready: %v", err)
	}
	eventually(t, 10*time.Second, "an upstream slot ready", func() bool { return h.proxy.Ready() > 0 })
	return h
}

// dialProxy is a plain client of the proxy (or one with opts instead of
// plaintext credentials), closed in t.Cleanup.
func dialProxy(t testing.TB, addr string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	if len(opts) == 0 {
		opts = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	cc, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		t.Fatalf("dial proxy: %v", err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// waitAllReady waits until every pool connection is READY.
func (h *harness) waitAllReady(t *testing.T) {
	t.Helper()
	eventually(t, 10*time.Second, "all upstream slots ready", func() bool { return h.proxy.Ready() == h.pool.Size() })
}

// callCtx is the context of one test RPC: every call has a deadline.
func callCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rawCodec sends and receives message bytes as they are, so a test can put
// exact bytes on the wire and see exact bytes come back.
type rawCodec struct{}

type rawMsg struct{ b []byte }

func (rawCodec) Name() string { return "proto" }
func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.(*rawMsg).b)}, nil
}
func (rawCodec) Unmarshal(d mem.BufferSlice, v any) error {
	v.(*rawMsg).b = d.Materialize()
	return nil
}

var _ encoding.CodecV2 = rawCodec{}
