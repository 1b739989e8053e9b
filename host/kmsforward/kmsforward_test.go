package kmsforward

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fixture struct {
	f    *Forwarder
	addr string // where "enclaves" connect (TCP standing in for vsock)
	logs *observer.ObservedLogs
}

func start(t *testing.T, cfg Config) *fixture {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	f, err := New(cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- f.Serve(l) }()
	t.Cleanup(func() {
		_ = l.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		f.Close()
	})
	return &fixture{f: f, addr: l.Addr().String(), logs: logs}
}

// TLS runs end to end through the forwarder: an HTTPS request through it
// reaches the endpoint, whose certificate the client checks itself.
func TestTLSEndToEnd(t *testing.T) {
	kms := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(append([]byte("kms saw: "), b...))
	}))
	defer kms.Close()
	fx := start(t, Config{Destination: kms.Listener.Addr().String()})
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", fx.addr) // the vsock dial
		},
		TLSClientConfig: &tls.Config{RootCAs: kms.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs, ServerName: "example.com"},
	}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := range 3 {
		resp, err := c.Post("https://example.com/", "application/x-amz-json-1.1", strings.NewReader(`{"KeyId":"k"}`))
		if err != nil {
			t.Fatalf("request %d through the forwarder: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != `kms saw: {"KeyId":"k"}` {
			t.Fatalf("response %q", b)
		}
	}
}

// The bytes go to the configured destination whatever the client says it
// wants (an HTTP CONNECT to elsewhere is relayed as bytes, to KMS).
func TestOnlyTheConfiguredDestination(t *testing.T) {
	dest, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer dest.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := dest.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 64)
		n, _ := c.Read(b)
		got <- b[:n]
	}()
	fx := start(t, Config{Destination: dest.Addr().String()})
	c, err := net.Dial("tcp", fx.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := []byte("CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, req) {
			t.Fatalf("destination got %q", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing reached the configured destination")
	}
}

// Bounds: one connection beyond MaxConns is closed at once; an idle one
// is closed after IdleTimeout; an unreachable endpoint closes the
// enclave's connection and says why.
func TestBounds(t *testing.T) {
	dest, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer dest.Close()
	go func() {
		for {
			c, err := dest.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	fx := start(t, Config{Destination: dest.Addr().String(), MaxConns: 1, IdleTimeout: 300 * time.Millisecond})
	first, err := net.Dial("tcp", fx.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if _, err := first.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	second, err := net.Dial("tcp", fx.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	_ = second.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := second.Read(make([]byte, 1)); err == nil {
		t.Fatal("a connection beyond MaxConns was served")
	}
	// The first goes idle and is closed.
	_ = first.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := first.Read(make([]byte, 1)); err == nil || time.Since(start) > 4*time.Second {
		t.Fatalf("idle connection not closed: %v after %v", err, time.Since(start))
	}

	down := start2(t)
	c, err := net.Dial("tcp", down.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection kept although the endpoint is unreachable")
	}
	deadline := time.Now().Add(5 * time.Second)
	for down.logs.FilterMessage("KMS forwarder: cannot reach the KMS endpoint").Len() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no log line for the unreachable endpoint")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// start2 is a forwarder to a port nothing listens on.
func start2(t *testing.T) *fixture {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return start(t, Config{Destination: addr, DialTimeout: time.Second})
}

func TestConfig(t *testing.T) {
	for _, bad := range []string{"", "kms.eu-west-1.amazonaws.com", ":443", "kms:0", "kms:x"} {
		if err := (Config{Destination: bad}).Validate(); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if err := (Config{Destination: "kms.eu-west-1.amazonaws.com:443"}).Validate(); err != nil {
		t.Fatal(err)
	}
}
