package proxy_test

import (
	"context"
	"net"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/host/bench"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// BenchmarkEcho is one Echo call at a time, straight to the upstream and
// through the proxy, in one process: the difference of the two is what the
// proxy costs per call (CPU and allocations; the wall time of a serial
// call also holds the wake-ups of its goroutines).
//
//	go test -run '^$' -bench BenchmarkEcho -benchmem -count 5 ./host/proxy/
func BenchmarkEcho(b *testing.B) {
	h := newHarness(b, harnessOpts{log: zap.NewNop()})
	direct := dialProxy(b, h.up.Addr())
	relay := dialProxy(b, startL4Relay(b, h.up.Addr()))
	for _, bc := range []struct {
		name string
		c    nitrosignv1.EchoServiceClient
	}{
		{"direct", nitrosignv1.NewEchoServiceClient(direct)},
		{"l4relay", nitrosignv1.NewEchoServiceClient(relay)},
		{"proxied", nitrosignv1.NewEchoServiceClient(h.cc)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			req := &nitrosignv1.EchoRequest{Payload: make([]byte, 32)}
			ctx := context.Background()
			call := func() {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				defer cancel()
				if _, err := bc.c.Echo(cctx, req); err != nil {
					b.Fatal(err)
				}
			}
			for range 100 {
				call()
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				call()
			}
		})
	}
}

// startL4Relay is the benchmark's plain relay (bench.L4Relay) to upstream,
// stopped in b.Cleanup.
func startL4Relay(b *testing.B, upstream string) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- bench.L4Relay(ctx, l, upstream, 0) }()
	b.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			b.Error(err)
		}
	})
	return l.Addr().String()
}
