package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/proxy"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// blockEcho makes the upstream's Echo report its deadline on seen and
// block until release is closed or its context ends.
func blockEcho(h *harness, seen chan<- time.Time, release <-chan struct{}) {
	h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
		d, _ := ctx.Deadline()
		seen <- d
		select {
		case <-release:
			return &nitrosignv1.EchoResponse{Payload: req.GetPayload()}, nil
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	})
}

func TestProxyMaxInFlight(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	h := newHarness(t, harnessOpts{log: zap.New(core), mutate: func(c *proxy.Config) { c.Limits.MaxInFlight = 2 }})
	seen, release := make(chan time.Time, 8), make(chan struct{})
	blockEcho(h, seen, release)
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	done := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{})
			done <- err
		}()
		<-seen
	}
	_, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{})
	if status.Code(err) != codes.ResourceExhausted || status.Convert(err).Message() != "proxy busy: 2 calls in flight, limit 2; retry with backoff" {
		t.Fatalf("third call = %v, want ResourceExhausted proxy busy", err)
	}
	if _, err := healthpb.NewHealthClient(h.cc).Check(callCtx(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health while busy: %v", err)
	}
	if logs.FilterMessageSnippet("shedding load").Len() != 1 {
		t.Fatalf("want one shedding log line, got %v", logs.All())
	}
	close(release)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if _, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{}); err != nil {
		t.Fatalf("after the load: %v", err)
	}
}

// A unary call without a deadline gets the default one, and it travels
// upstream; a caller's deadline is kept; streams are left alone.
func TestProxyDefaultCallTimeout(t *testing.T) {
	const def = 300 * time.Millisecond
	h := newHarness(t, harnessOpts{mutate: func(c *proxy.Config) { c.Limits.DefaultCallTimeout = def }})
	seen, release := make(chan time.Time, 8), make(chan struct{})
	defer close(release)
	blockEcho(h, seen, release)
	echo := nitrosignv1.NewEchoServiceClient(h.cc)

	errc := make(chan error, 1)
	go func() {
		_, err := echo.Echo(context.Background(), &nitrosignv1.EchoRequest{})
		errc <- err
	}()
	if d := <-seen; d.IsZero() {
		t.Fatal("the upstream saw no deadline: the default did not travel")
	}
	select {
	case err := <-errc:
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("call without deadline = %v, want DeadlineExceeded", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a call without a deadline never ended")
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	go func() {
		_, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{})
		errc <- err
	}()
	if d, want := <-seen, time.Now().Add(50*time.Minute); d.Before(want) {
		t.Fatalf("the caller's hour became %v", time.Until(d))
	}
	cancel()
	<-errc

	// A stream without a deadline outlives the unary default.
	s, err := testpb.NewTestServiceClient(h.cc).FullDuplexCall(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * def)
	if err := s.Send(&testpb.StreamingOutputCallRequest{ResponseParameters: []*testpb.ResponseParameters{{Size: 3}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatalf("stream after the unary default: %v", err)
	}
	_ = s.CloseSend()
	for {
		if _, err := s.Recv(); err != nil {
			break
		}
	}
}

func TestProxyMetadataLimits(t *testing.T) {
	h := newHarness(t, harnessOpts{mutate: func(c *proxy.Config) { c.Limits.MaxMetadataSize = 1 << 10 }})
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	ctx := metadata.AppendToOutgoingContext(callCtx(t), "x-big", strings.Repeat("v", 2<<10))
	_, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "limit 1024") {
		t.Fatalf("Echo with 2 KiB metadata = %v, want ResourceExhausted", err)
	}
	if _, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{}); err != nil {
		t.Fatal(err)
	}
}

func TestProxyMaxConnections(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	h := newHarness(t, harnessOpts{log: zap.New(core), mutate: func(c *proxy.Config) { c.Limits.MaxConnections = 1 }})
	if _, err := healthpb.NewHealthClient(h.cc).Check(callCtx(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	other := dialProxy(t, h.addr)
	_, err := healthpb.NewHealthClient(other).Check(callCtx(t), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("second connection: %v, want Unavailable", err)
	}
	eventually(t, 5*time.Second, "the refusal log line", func() bool {
		return logs.FilterMessageSnippet("too many open connections").Len() > 0
	})
	if _, err := healthpb.NewHealthClient(h.cc).Check(callCtx(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("the admitted connection: %v", err)
	}
}

func TestLimitsConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*proxy.Config)
		wantErr string
	}{
		{"defaults", func(*proxy.Config) {}, ""},
		{"no idle or age limit", func(c *proxy.Config) {
			c.Limits.MaxConnectionIdle, c.Limits.MaxConnectionAge, c.Limits.MaxConnectionAgeGrace = 0, 0, 0
		}, ""},
		{"max connections", func(c *proxy.Config) { c.Limits.MaxConnections = 0 }, "max connections 0: want 1 to 65536"},
		{"max in flight", func(c *proxy.Config) { c.Limits.MaxInFlight = -1 }, "max in-flight calls -1"},
		{"streams", func(c *proxy.Config) { c.Limits.MaxConcurrentStreams = 0 }, "max concurrent streams per connection 0"},
		{"metadata", func(c *proxy.Config) { c.Limits.MaxMetadataSize = 0 }, "max metadata size 0"},
		{"metadata over header list", func(c *proxy.Config) { c.Limits.MaxMetadataSize = 64 << 10 }, "max metadata size 65536 exceeds the max header list size 32768"},
		{"default timeout", func(c *proxy.Config) { c.Limits.DefaultCallTimeout = 0 }, "default call timeout 0s: must be > 0"},
		{"handshake", func(c *proxy.Config) { c.Limits.HandshakeTimeout = -time.Second }, "handshake timeout -1s: must not be negative"},
		{"keepalive time", func(c *proxy.Config) { c.Limits.KeepaliveTime = 0 }, "keepalive time 0s: must be > 0"},
		{"negative age", func(c *proxy.Config) { c.Limits.MaxConnectionAge = -time.Second }, "max connection age -1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := proxy.DefaultConfig()
			tt.mutate(&c)
			err := c.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Validate = %v, want %q", err, tt.wantErr)
			}
		})
	}
}
