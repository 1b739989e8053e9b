package target

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in   string
		want Target
		err  bool
	}{
		{in: "vsock://16:5005", want: Target{Scheme: VSOCK, CID: 16, Port: 5005}},
		{in: "vsock://1:1", want: Target{Scheme: VSOCK, CID: 1, Port: 1}},
		{in: "vsock://4294967295:5005", want: Target{Scheme: VSOCK, CID: 4294967295, Port: 5005}},
		{in: "tcp://127.0.0.1:8443", want: Target{Scheme: TCP, HostPort: "127.0.0.1:8443"}},
		{in: "tcp://[::1]:8443", want: Target{Scheme: TCP, HostPort: "[::1]:8443"}},
		{in: "tcp://localhost:1", want: Target{Scheme: TCP, HostPort: "localhost:1"}},
		{in: "", err: true},
		{in: "127.0.0.1:8443", err: true},
		{in: "http://127.0.0.1:80", err: true},
		{in: "vsock://", err: true},
		{in: "vsock://16", err: true},
		{in: "vsock://16:", err: true},
		{in: "vsock://:5005", err: true},
		{in: "vsock://-1:5005", err: true},
		{in: "vsock://4294967296:5005", err: true},
		{in: "vsock://16:0", err: true},
		{in: "vsock://16:5005/x", err: true},
		{in: "vsock://x:5005", err: true},
		{in: "tcp://127.0.0.1", err: true},
		{in: "tcp://:8443", err: true},
		{in: "tcp://127.0.0.1:0", err: true},
		{in: "tcp://127.0.0.1:65536", err: true},
		{in: "tcp://127.0.0.1:http", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.err {
				if err == nil {
					t.Fatalf("Parse(%q) = %+v, want error", tt.in, got)
				}
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("Parse(%q) error %v does not wrap ErrInvalid", tt.in, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("Parse(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			again, err := Parse(got.String())
			if err != nil || again != got {
				t.Fatalf("round trip of %q: %+v, %v", got.String(), again, err)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"vsock://16:5005", "tcp://127.0.0.1:1", "tcp://[::1]:2", "vsock://1:", "x://"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := Parse(s)
		if err != nil {
			return
		}
		again, err := Parse(got.String())
		if err != nil || again != got {
			t.Fatalf("Parse(%q) = %+v does not round-trip: %+v, %v", s, got, again, err)
		}
	})
}

func TestDialTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	tg, err := Parse("tcp://" + l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tg.Dialer()(ctx, "ignored")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestDialCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, s := range []string{"vsock://1:5005", "tcp://127.0.0.1:1"} {
		tg, err := Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		if c, err := tg.Dial(ctx); err == nil {
			c.Close()
			t.Fatalf("Dial(%s) with a canceled context succeeded", s)
		}
	}
}
