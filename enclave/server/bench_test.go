//go:build unix

package server

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/enclave/stats"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// benchServer is a started server on an in-memory listener, with counters
// when withStats, and a client connection to it; both end at cleanup.
func benchServer(b *testing.B, withStats bool) *grpc.ClientConn {
	b.Helper()
	sg, err := signer.New(signer.Params{Config: signer.Config{}, Logger: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	var st *stats.Stats
	if withStats {
		st = stats.New()
	}
	lis := bufconn.Listen(1 << 20)
	srv, err := New(Params{Logger: zap.NewNop(), Listener: lis, Signer: sg, Stats: st})
	if err != nil {
		b.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Stop(ctx)
	})
	return conn
}

// processCPU is the CPU time the process has used, user and system.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the process's CPU time per call since start as
// cpu-ns/op: unlike ns/op, it hardly moves when other processes compete
// for the cores.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(processCPU(b)-start)/float64(b.N), "cpu-ns/op")
}

// BenchmarkEcho is the per-call cost of the server's edge (transport,
// interceptors, call counting; client included, in the same process): a
// small Echo over bufconn, with and without counters, one caller and
// GOMAXPROCS callers.
//
//	go test -run '^$' -bench Echo -benchmem ./enclave/server/
func BenchmarkEcho(b *testing.B) {
	for _, bc := range []struct {
		name      string
		withStats bool
	}{{"stats", true}, {"nostats", false}} {
		b.Run(bc.name, func(b *testing.B) {
			c := pb.NewEchoServiceClient(benchServer(b, bc.withStats))
			req := &pb.EchoRequest{Payload: []byte("ping")}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			if _, err := c.Echo(ctx, req); err != nil { // connect
				b.Fatal(err)
			}
			b.Run("serial", func(b *testing.B) {
				b.ReportAllocs()
				cpu := processCPU(b)
				for b.Loop() {
					if _, err := c.Echo(ctx, req); err != nil {
						b.Fatal(err)
					}
				}
				reportCPU(b, cpu)
			})
			b.Run("parallel", func(b *testing.B) {
				b.ReportAllocs()
				cpu := processCPU(b)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if _, err := c.Echo(ctx, req); err != nil {
							b.Error(err)
							return
						}
					}
				})
				reportCPU(b, cpu)
			})
		})
	}
}
