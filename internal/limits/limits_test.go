package limits

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
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestInFlight(t *testing.T) {
	shed := 0
	l := NewInFlight("enclave", 2, func() { shed++ })
	if err := l.Acquire(); err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(); err != nil {
		t.Fatal(err)
	}
	err := l.Acquire()
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third Acquire = %v, want ResourceExhausted", err)
	}
	want := "enclave busy: 2 calls in flight, limit 2; retry with backoff"
	if msg := status.Convert(err).Message(); msg != want {
		t.Fatalf("message %q, want %q", msg, want)
	}
	if l.Current() != 2 || l.Shed() != 1 || shed != 1 {
		t.Fatalf("current %d shed %d callback %d, want 2 1 1", l.Current(), l.Shed(), shed)
	}
	l.Release()
	if err := l.Acquire(); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	l.Release()
	l.Release()
	if l.Current() != 0 {
		t.Fatalf("current %d after releasing everything", l.Current())
	}
	if NewInFlight("x", 0, nil).Limit() != 1 {
		t.Fatal("a limit below 1 must be raised to 1")
	}
}

// Under contention the bound holds exactly: never more than limit slots
// taken, and every call either holds one or was shed.
func TestInFlightConcurrent(t *testing.T) {
	const limit, workers, rounds = 8, 32, 2000
	l := NewInFlight("proxy", limit, nil)
	var (
		mu    sync.Mutex
		peak  int64
		inUse int64 // admitted and not yet released
		wg    sync.WaitGroup
		ok    int64
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range rounds {
				if l.Acquire() != nil {
					continue
				}
				mu.Lock()
				ok++
				inUse++
				if inUse > peak {
					peak = inUse
				}
				mu.Unlock()
				mu.Lock()
				inUse--
				mu.Unlock()
				l.Release()
			}
		}()
	}
	wg.Wait()
	if peak > limit {
		t.Fatalf("peak %d calls in flight, limit %d", peak, limit)
	}
	if ok+int64(l.Shed()) != workers*rounds {
		t.Fatalf("%d admitted + %d shed != %d calls", ok, l.Shed(), workers*rounds)
	}
	if l.Current() != 0 {
		t.Fatalf("%d slots leaked", l.Current())
	}
}

type stream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s stream) Context() context.Context { return s.ctx }

func TestInterceptors(t *testing.T) {
	l := NewInFlight("enclave", 1, nil)
	if err := l.Acquire(); err != nil { // the only slot is taken
		t.Fatal(err)
	}
	defer l.Release()
	unary := l.UnaryInterceptor()
	streamI := l.StreamInterceptor()
	called := 0
	h := func(context.Context, any) (any, error) { called++; return "ok", nil }
	sh := func(any, grpc.ServerStream) error { called++; return nil }
	ss := stream{ctx: context.Background()}
	tests := []struct {
		method string
		want   codes.Code
	}{
		{"/nitrosign.v1.SignerService/Sign", codes.ResourceExhausted},
		{"/grpc.health.v1.Health/Check", codes.OK},
		{"/grpc.health.v1.Health/Watch", codes.OK},
		{"/grpc.health.v1.HealthX/Check", codes.ResourceExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.method, func(t *testing.T) {
			_, err := unary(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: tt.method}, h)
			if status.Code(err) != tt.want {
				t.Fatalf("unary: %v, want %v", err, tt.want)
			}
			err = streamI(nil, ss, &grpc.StreamServerInfo{FullMethod: tt.method}, sh)
			if status.Code(err) != tt.want {
				t.Fatalf("stream: %v, want %v", err, tt.want)
			}
		})
	}
	if called != 4 {
		t.Fatalf("handlers ran %d times, want 4 (the exempt calls)", called)
	}
}

func TestDefaultDeadline(t *testing.T) {
	i := DefaultDeadline(time.Hour)
	var got time.Time
	var had bool
	h := func(ctx context.Context, _ any) (any, error) { got, had = ctx.Deadline(); return nil, nil }
	info := &grpc.UnaryServerInfo{FullMethod: "/x/y"}

	before := time.Now()
	_, _ = i(context.Background(), nil, info, h)
	if !had || got.Before(before.Add(time.Hour)) || got.After(time.Now().Add(time.Hour)) {
		t.Fatalf("no deadline: got %v %v, want about an hour from now", got, had)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	want, _ := ctx.Deadline()
	_, _ = i(ctx, nil, info, h)
	if !got.Equal(want) {
		t.Fatalf("the caller's deadline %v was replaced by %v", want, got)
	}
	ctx2, cancel2 := WithDefaultDeadline(context.Background(), 0)
	defer cancel2()
	if _, ok := ctx2.Deadline(); ok {
		t.Fatal("a zero default must not set a deadline")
	}
}

func TestMetadata(t *testing.T) {
	md := metadata.Pairs("a", "bc", "a", "", "key", strings.Repeat("v", 100))
	if n, want := MetadataSize(md), (1+2+32)+(1+0+32)+(3+100+32); n != want {
		t.Fatalf("MetadataSize = %d, want %d", n, want)
	}
	tests := []struct {
		name  string
		md    metadata.MD
		limit int
		want  codes.Code
	}{
		{"none", nil, 10, codes.OK},
		{"within", md, 300, codes.OK},
		{"exactly", md, 203, codes.OK},
		{"beyond", md, 202, codes.ResourceExhausted},
		{"huge", metadata.Pairs("x", strings.Repeat("y", 1<<20)), 16 << 10, codes.ResourceExhausted},
		{"pseudo-header and binary", metadata.MD{":authority": {"h\xff"}, "k-bin": {"\x00\xff"}}, 1 << 10, codes.OK},
		{"printable ascii", metadata.Pairs("x-request-id", "a b~!"), 1 << 10, codes.OK},
		{"invalid utf-8 value", metadata.Pairs("x-trace", "a\xff\xfe"), 1 << 10, codes.InvalidArgument},
		{"utf-8 text value", metadata.Pairs("x-name", "café"), 1 << 10, codes.InvalidArgument},
		{"control character", metadata.MD{"x": {"a\x01"}}, 1 << 10, codes.InvalidArgument},
		{"key with illegal character", metadata.MD{"x!y": {"v"}}, 1 << 10, codes.InvalidArgument},
		{"key with a space", metadata.MD{"x id": {"v"}}, 1 << 10, codes.InvalidArgument},
		{"empty key", metadata.MD{"": {"v"}}, 1 << 10, codes.InvalidArgument},
		{"size checked first", metadata.Pairs("x", "\xff"+strings.Repeat("y", 100)), 10, codes.ResourceExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := metadata.NewIncomingContext(context.Background(), tt.md)
			err := CheckMetadata(ctx, tt.limit)
			if status.Code(err) != tt.want {
				t.Fatalf("CheckMetadata = %v, want %v", err, tt.want)
			}
			_, uerr := MetadataUnary(tt.limit)(ctx, nil, &grpc.UnaryServerInfo{}, func(context.Context, any) (any, error) { return nil, nil })
			serr := MetadataStream(tt.limit)(nil, stream{ctx: ctx}, &grpc.StreamServerInfo{}, func(any, grpc.ServerStream) error { return nil })
			if status.Code(uerr) != tt.want || status.Code(serr) != tt.want {
				t.Fatalf("interceptors: %v / %v, want %v", uerr, serr, tt.want)
			}
		})
	}
}

func TestListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rejected := make(chan int64, 16)
	l := NewListener(inner, 2, func(open int64) { rejected <- open })
	defer l.Close()

	accepted := make(chan net.Conn, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("Accept: %v", err)
				}
				return
			}
			accepted <- c
		}
	}()
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dial()
	dial()
	s1, s2 := <-accepted, <-accepted
	if l.Open() != 2 {
		t.Fatalf("open %d, want 2", l.Open())
	}
	// The third is closed at once: the client reads EOF.
	c3 := dial()
	if open := <-rejected; open != 2 {
		t.Fatalf("rejected with %d open, want 2", open)
	}
	_ = c3.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c3.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("third connection read %v, want EOF", err)
	}
	// Closing one (twice: the slot is given back once) makes room.
	s1.Close()
	s1.Close()
	if l.Open() != 1 {
		t.Fatalf("open %d after a close, want 1", l.Open())
	}
	dial()
	s3 := <-accepted
	if l.Open() != 2 || l.Rejected() != 1 || l.Max() != 2 {
		t.Fatalf("open %d rejected %d max %d, want 2 1 2", l.Open(), l.Rejected(), l.Max())
	}
	s2.Close()
	s3.Close()
	l.Close()
	<-done
}

func TestThrottle(t *testing.T) {
	now := time.Unix(1000, 0)
	th := NewThrottle(time.Second)
	th.now = func() time.Time { return now }
	if ok, n := th.Allow(); !ok || n != 0 {
		t.Fatalf("first: %v %d", ok, n)
	}
	for range 5 {
		if ok, _ := th.Allow(); ok {
			t.Fatal("allowed within the interval")
		}
	}
	now = now.Add(time.Second)
	if ok, n := th.Allow(); !ok || n != 5 {
		t.Fatalf("after the interval: %v %d, want true 5", ok, n)
	}
}
