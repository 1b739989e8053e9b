package proxy

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// countingPool counts buffers out of and back into the pool and records
// returns of buffers that were not out.
type countingPool struct {
	mu   sync.Mutex
	live map[*[]byte]bool
	puts int
	bad  int
}

func newCountingPool() *countingPool { return &countingPool{live: map[*[]byte]bool{}} }

func (p *countingPool) Get(n int) *[]byte {
	b := make([]byte, n)
	p.mu.Lock()
	p.live[&b] = true
	p.mu.Unlock()
	return &b
}

func (p *countingPool) Put(b *[]byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.live[b] {
		p.bad++
		return
	}
	delete(p.live, b)
	p.puts++
}

func (p *countingPool) state() (live, puts, bad int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.live), p.puts, p.bad
}

// received builds what grpc hands a codec: pooled buffers from p. Each
// part is padded to 2 KiB, since grpc does not pool buffers under 1 KiB
// (mem.IsBelowBufferPoolingThreshold).
func received(p mem.BufferPool, parts ...string) mem.BufferSlice {
	var s mem.BufferSlice
	for _, part := range parts {
		b := p.Get(2 << 10)
		copy(*b, pad(part))
		s = append(s, mem.NewBuffer(b, p))
	}
	return s
}

// pad right-pads s with dots to 2 KiB.
func pad(s string) string { return s + strings.Repeat(".", 2<<10-len(s)) }

func TestCodecRefcounts(t *testing.T) {
	c, err := NewCodec()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		// run gets the received data after Unmarshal (grpc frees its own
		// reference right after) and must leave nothing held.
		run func(t *testing.T, f *Frame)
	}{
		{"marshal then transport frees", func(t *testing.T, f *Frame) {
			out, err := c.Marshal(f)
			if err != nil {
				t.Fatal(err)
			}
			if got := string(out.Materialize()); got != pad("hello, ")+pad("world") {
				t.Fatalf("marshalled %q", got)
			}
			out.Free() // what grpc's SendMsg does after writing
			f.Free()   // the proxy's unconditional Free is a no-op now
		}},
		{"never sent: Free releases", func(t *testing.T, f *Frame) {
			f.Free()
			f.Free() // idempotent
		}},
		{"marshal twice is an error, not an empty message", func(t *testing.T, f *Frame) {
			out, err := c.Marshal(f)
			if err != nil {
				t.Fatal(err)
			}
			out.Free()
			if _, err := c.Marshal(f); !errors.Is(err, errFrameResent) {
				t.Fatalf("second Marshal = %v, want errFrameResent", err)
			}
		}},
		{"reused frame drops the previous message", func(t *testing.T, f *Frame) {
			p := newCountingPool()
			next := received(p, "second")
			if err := c.Unmarshal(next, f); err != nil {
				t.Fatal(err)
			}
			next.Free()
			out, err := c.Marshal(f)
			if err != nil {
				t.Fatal(err)
			}
			if got := string(out.Materialize()); got != pad("second") {
				t.Fatalf("marshalled %q after reuse", got)
			}
			out.Free()
			if live, _, bad := p.state(); live != 0 || bad != 0 {
				t.Fatalf("second message: %d live, %d bad puts", live, bad)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newCountingPool()
			data := received(p, "hello, ", "world")
			var f Frame
			if err := c.Unmarshal(data, &f); err != nil {
				t.Fatal(err)
			}
			data.Free() // grpc's recv frees its reference when Unmarshal returns
			if live, _, _ := p.state(); live != 2 {
				t.Fatalf("after Unmarshal %d buffers live, want 2 (held by the Frame)", live)
			}
			if f.Len() != 4<<10 {
				t.Fatalf("Len = %d", f.Len())
			}
			tt.run(t, &f)
			if live, puts, bad := p.state(); live != 0 || puts != 2 || bad != 0 {
				t.Fatalf("buffers: %d live, %d returned, %d bad returns; want 0, 2, 0", live, puts, bad)
			}
		})
	}
}

func TestCodecFallback(t *testing.T) {
	c, err := NewCodec()
	if err != nil {
		t.Fatal(err)
	}
	in := &nitrosignv1.EchoRequest{Payload: []byte("via proto")}
	data, err := c.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	defer data.Free()
	var out nitrosignv1.EchoRequest
	if err := c.Unmarshal(data, &out); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(in, &out) {
		t.Fatalf("round trip %v != %v", &out, in)
	}
	if _, err := c.Marshal(struct{}{}); err == nil {
		t.Fatal("Marshal of a non-message succeeded")
	}
	if c.Name() != "proto" {
		t.Fatalf("Name = %q", c.Name())
	}
}

func TestFilterMetadata(t *testing.T) {
	in := metadata.MD{
		":authority":              {"proxy:8443"},
		"content-type":            {"application/grpc"},
		"user-agent":              {"grpc-go/1.85.0"},
		"te":                      {"trailers"},
		"grpc-accept-encoding":    {"gzip"},
		"grpc-status-details-bin": {"x"},
		"connection":              {"keep-alive"},
		"authorization":           {"Bearer t"},
		"x-request-id":            {"1", "2"},
		"x-trace-bin":             {"\x00\x01"},
	}
	got := filterMetadata(in)
	want := metadata.MD{
		"authorization": {"Bearer t"},
		"x-request-id":  {"1", "2"},
		"x-trace-bin":   {"\x00\x01"},
	}
	if len(got) != len(want) {
		t.Fatalf("filterMetadata = %v, want %v", got, want)
	}
	for k, v := range want {
		if g := got[k]; len(g) != len(v) || g[0] != v[0] {
			t.Fatalf("filterMetadata[%q] = %q, want %q", k, g, v)
		}
	}
	got["x-request-id"][0] = "changed"
	if in["x-request-id"][0] != "1" {
		t.Fatal("filterMetadata shares value slices with its input")
	}
}

func TestInterceptors(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(core)
	unaryInfo := &grpc.UnaryServerInfo{FullMethod: "/svc/Unary"}
	streamInfo := &grpc.StreamServerInfo{FullMethod: "/svc/Stream"}
	chainUnary := func(h grpc.UnaryHandler) (any, error) {
		return logUnary(log)(context.Background(), "req", unaryInfo, func(ctx context.Context, req any) (any, error) {
			return recoverUnary(log)(ctx, req, unaryInfo, h)
		})
	}
	chainStream := func(h grpc.StreamHandler) error {
		ss := &fakeStream{ctx: context.Background()}
		return logStream(log)(nil, ss, streamInfo, func(srv any, ss grpc.ServerStream) error {
			return recoverStream(log)(srv, ss, streamInfo, h)
		})
	}
	tests := []struct {
		name     string
		run      func() error
		wantCode codes.Code
	}{
		{"unary ok", func() error {
			_, err := chainUnary(func(context.Context, any) (any, error) { return "resp", nil })
			return err
		}, codes.OK},
		{"unary error passes through", func() error {
			_, err := chainUnary(func(context.Context, any) (any, error) { return nil, status.Error(codes.NotFound, "x") })
			return err
		}, codes.NotFound},
		{"unary panic is Internal", func() error {
			_, err := chainUnary(func(context.Context, any) (any, error) { panic("boom") })
			return err
		}, codes.Internal},
		{"stream panic is Internal", func() error {
			return chainStream(func(any, grpc.ServerStream) error { panic(errors.New("boom")) })
		}, codes.Internal},
		{"stream ok", func() error {
			return chainStream(func(any, grpc.ServerStream) error { return nil })
		}, codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs.TakeAll()
			err := tt.run()
			if status.Code(err) != tt.wantCode {
				t.Fatalf("err = %v, want %v", err, tt.wantCode)
			}
			calls := logs.FilterMessage("call").All()
			if len(calls) != 1 {
				t.Fatalf("%d call log entries, want 1", len(calls))
			}
			fields := calls[0].ContextMap()
			if fields["code"] != tt.wantCode.String() || fields["method"] == "" || fields["latency"] == nil {
				t.Fatalf("call log fields %v", fields)
			}
			if tt.wantCode == codes.Internal && logs.FilterMessage("panic in handler").Len() != 1 {
				t.Fatal("panic not logged")
			}
		})
	}
}

type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *fakeStream) Context() context.Context { return s.ctx }
