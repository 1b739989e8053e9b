package server

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// blocker is a test service whose Wait blocks until released or until its
// context ends, and reports the deadline it saw.
type blocker struct {
	entered  chan struct{}
	release  chan struct{}
	deadline chan time.Time // zero time: none
}

func newBlocker() *blocker {
	return &blocker{entered: make(chan struct{}, 64), release: make(chan struct{}), deadline: make(chan time.Time, 64)}
}

func (b *blocker) wait(ctx context.Context) (any, error) {
	d, _ := ctx.Deadline()
	b.deadline <- d
	b.entered <- struct{}{}
	select {
	case <-b.release:
		return &emptypb.Empty{}, nil
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

var blockerDesc = grpc.ServiceDesc{
	ServiceName: "nitrosign.test.Blocker",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Wait",
		Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, _ any) (any, error) { return srv.(*blocker).wait(ctx) }
			if ic == nil {
				return h(ctx, in)
			}
			return ic(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/nitrosign.test.Blocker/Wait"}, h)
		},
	}},
}

// blockingFixture is a started fixture with the blocker registered.
func blockingFixture(t *testing.T, cfg Config) (*fixture, *blocker) {
	t.Helper()
	f := newFixture(t, false, cfg)
	b := newBlocker()
	f.srv.GRPC().RegisterService(&blockerDesc, b)
	if err := f.srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = f.srv.Stop(ctx)
	})
	return f, b
}

func callWait(ctx context.Context, cc grpc.ClientConnInterface) error {
	return cc.Invoke(ctx, "/nitrosign.test.Blocker/Wait", &emptypb.Empty{}, &emptypb.Empty{})
}

// Calls beyond MaxInFlight are refused at once with a precise
// ResourceExhausted; health calls are exempt; a freed slot serves again.
func TestMaxInFlight(t *testing.T) {
	f, b := blockingFixture(t, configWith(func(c *Config) { c.Limits.MaxInFlight = 2 }))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 2)
	for range 2 {
		go func() { done <- callWait(ctx, f.conn) }()
		<-b.entered
	}
	_, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third call = %v, want ResourceExhausted", err)
	}
	if want := "enclave busy: 2 calls in flight, limit 2; retry with backoff"; status.Convert(err).Message() != want {
		t.Fatalf("message %q, want %q", status.Convert(err).Message(), want)
	}
	if resp, err := healthpb.NewHealthClient(f.conn).Check(ctxT(t), &healthpb.HealthCheckRequest{}); err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health while busy: %v %v, want SERVING", resp, err)
	}
	if n := f.logs.FilterMessage("shedding load: calls refused with ResourceExhausted").Len(); n != 1 {
		t.Fatalf("%d shedding log lines, want 1", n)
	}
	close(b.release)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatalf("held call: %v", err)
		}
	}
	if _, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{}); err != nil {
		t.Fatalf("after the held calls ended: %v", err)
	}
}

// A unary call without a deadline gets the default one; a caller's own
// deadline is kept.
func TestDefaultCallTimeout(t *testing.T) {
	f, b := blockingFixture(t, configWith(func(c *Config) { c.Limits.DefaultCallTimeout = 300 * time.Millisecond }))
	errc := make(chan error, 1)
	start := time.Now()
	go func() { errc <- callWait(context.Background(), f.conn) }()
	select {
	case err := <-errc:
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("call without deadline = %v, want DeadlineExceeded", err)
		}
	case <-time.After(20 * time.Second):
		close(b.release)
		t.Fatal("a call without a deadline never ended: no default deadline")
	}
	if d := <-b.deadline; d.IsZero() || d.Before(start) {
		t.Fatalf("handler saw deadline %v", d)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	want, _ := ctx.Deadline()
	go func() { errc <- callWait(ctx, f.conn) }()
	<-b.entered
	<-b.entered // the first call's entry
	close(b.release)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	// grpc-timeout has a resolution; the caller's hour survives roughly.
	if got := <-b.deadline; got.Before(want.Add(-time.Minute)) {
		t.Fatalf("the caller's deadline %v became %v", want, got)
	}
}

// Metadata over MaxMetadataSize gets ResourceExhausted, invalid metadata
// InvalidArgument; over MaxHeaderListSize grpc-go's client refuses to send.
func TestMetadataLimits(t *testing.T) {
	f := newFixture(t, true, configWith(func(c *Config) { c.Limits.MaxMetadataSize = 2 << 10; c.Limits.MaxHeaderListSize = 8 << 10 }))
	echo := pb.NewEchoServiceClient(f.conn)
	tests := []struct {
		name string
		md   metadata.MD
		want codes.Code
		msg  string
	}{
		{"small", metadata.Pairs("x-a", "b"), codes.OK, ""},
		{"over the metadata limit", metadata.Pairs("x-big", strings.Repeat("v", 4<<10)), codes.ResourceExhausted, "limit 2048"},
		{"over the header list limit", metadata.Pairs("x-big", strings.Repeat("v", 16<<10)), codes.Internal, "violates the maximum size (8192 bytes) set by server"},
		{"binary is fine", metadata.Pairs("x-b-bin", "\x00\xff"), codes.OK, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := echo.Echo(metadata.NewOutgoingContext(ctxT(t), tt.md), &pb.EchoRequest{})
			if status.Code(err) != tt.want || !strings.Contains(status.Convert(err).Message(), tt.msg) {
				t.Fatalf("Echo = %v, want %v with %q", err, tt.want, tt.msg)
			}
			if _, err := echo.Echo(ctxT(t), &pb.EchoRequest{}); err != nil {
				t.Fatalf("good call after: %v", err)
			}
		})
	}
}

// Connections beyond MaxConnections are closed at once and logged; the
// server keeps serving the ones it holds.
func TestMaxConnections(t *testing.T) {
	f := newFixture(t, true, configWith(func(c *Config) { c.Limits.MaxConnections = 1 }))
	// f.conn holds the one slot once it has connected.
	if _, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{}); err != nil {
		t.Fatal(err)
	}
	c, err := f.lis.DialContext(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isClosed(err) {
		t.Fatalf("connection beyond the limit read %v, want it closed", err)
	}
	if _, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{}); err != nil {
		t.Fatalf("the admitted connection stopped working: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for f.logs.FilterMessage("connection refused: too many open connections").Len() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no log line for the refused connection")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The server's configuration follows internal/limits' convention: built
// from DefaultConfig, every invalid field reported; the limit rules
// themselves are tested there.
func TestConfigValidate(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	d := DefaultConfig()
	if d.Limits.MaxInFlight != 1024 || d.Limits.MaxConnectionAge != 0 || d.Limits.MaxConnectionIdle != 0 ||
		d.Limits.KeepaliveMinTime != 10*time.Second || d.Limits.MaxRecvMsgSize != 1<<20 {
		t.Fatalf("defaults %+v", d)
	}
	bad := configWith(func(c *Config) {
		c.GracefulStopTimeout = -1
		c.Limits.MaxInFlight = -1
		c.Limits.MaxRecvMsgSize = 65 << 20
	})
	err := bad.Validate()
	for _, want := range []string{"graceful stop timeout", "max in-flight calls -1", "max receive message size 68157440"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v, want it to report %q", err, want)
		}
	}
	if err := (Config{}).Validate(); err == nil {
		t.Error("a zero Config validated: it must be built from DefaultConfig")
	}
}

// configWith is DefaultConfig changed by mod.
func configWith(mod func(*Config)) Config {
	c := DefaultConfig()
	mod(&c)
	return c
}

// A malformed request refused by a limit still gets its precise status,
// and leaves nothing behind in the codec's table of malformed requests.
func TestMalformedUnderLimits(t *testing.T) {
	f, b := blockingFixture(t, configWith(func(c *Config) { c.Limits.MaxInFlight = 1; c.Limits.MaxMetadataSize = 1 << 10 }))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- callWait(ctx, f.conn) }()
	<-b.entered // the only slot is taken
	bad := rawMessage{0x0a, 0xff}
	for _, ctx := range []context.Context{
		ctxT(t), // refused by the in-flight bound
		metadata.AppendToOutgoingContext(ctxT(t), "x-big", strings.Repeat("v", 2<<10)), // and by the metadata limit
	} {
		err := f.conn.Invoke(ctx, "/nitrosign.v1.SignerService/Sign", bad, &pb.SignResponse{}, grpc.ForceCodecV2(rawCodec{}))
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("malformed request = %v, want InvalidArgument", err)
		}
	}
	_, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("well-formed request while full = %v, want ResourceExhausted", err)
	}
	close(b.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	n := 0
	malformed.Range(func(any, any) bool { n++; return true })
	if n != 0 {
		t.Fatalf("%d malformed requests left in the codec's table", n)
	}
}
