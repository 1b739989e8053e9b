package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// tcpPair is a connected pair of TCP loopback sockets.
func tcpPair(t *testing.T) (a, b net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	a, err = net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b = <-accepted
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestSockReader: the raw reads wait in the poller for data, note when it
// came, and end as net.Conn reads do: EOF, a deadline, a local close.
func TestSockReader(t *testing.T) {
	a, b := tcpPair(t)
	var last atomic.Int64
	r := newSockReader(b, &last)
	if r.rc == nil {
		t.Fatal("a TCP connection has no raw connection")
	}
	go func() {
		time.Sleep(20 * time.Millisecond) // the read waits for it
		a.Write([]byte("hello"))
	}()
	buf := make([]byte, 16)
	n, err := r.Read(buf)
	if err != nil || string(buf[:n]) != "hello" || last.Load() == 0 {
		t.Fatalf("read %q, %v (last %d)", buf[:n], err, last.Load())
	}

	// A read deadline ends a waiting read with a timeout.
	b.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	if _, err := r.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want a timeout", err)
	}
	b.SetReadDeadline(time.Time{})

	// The peer closing is EOF, after what it sent.
	a.Write([]byte("bye"))
	a.Close()
	got, err := io.ReadAll(r)
	if err != nil || string(got) != "bye" {
		t.Fatalf("read to the end: %q, %v", got, err)
	}

	// Closed locally while a read waits: net.ErrClosed.
	_, d := tcpPair(t)
	r = newSockReader(d, &last)
	done := make(chan error, 1)
	go func() {
		_, err := r.Read(buf)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	d.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read on a closed connection: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a read waiting on a closed connection did not return")
	}
}

// TestSockWriter: a write takes what the socket accepts now and never
// waits: the rest of a write larger than the socket's buffers is left to
// the caller (the flusher); an error names the connection.
func TestSockWriter(t *testing.T) {
	a, b := tcpPair(t)
	w := newSockWriter(a, rawConnOf(a))
	n, err := w.writeNow([]byte("ping"))
	if n != 4 || err != nil {
		t.Fatalf("writeNow: %d, %v", n, err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(b, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("peer read %q, %v", buf, err)
	}

	// The peer does not read: the socket fills and writeNow returns short
	// instead of blocking.
	big := bytes.Repeat([]byte{'x'}, 64<<20)
	start := time.Now()
	n, err = w.writeNow(big)
	if err != nil || n <= 0 || n >= len(big) {
		t.Fatalf("writeNow of %d bytes to a peer that does not read: %d, %v; want a short write", len(big), n, err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("writeNow waited %v", d)
	}

	// The peer is gone: a write fails with an error naming the connection.
	b.Close()
	var werr error
	for range 100 {
		if _, werr = w.writeNow([]byte("after close")); werr != nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	var op *net.OpError
	if !errors.As(werr, &op) || op.Op != "write" || op.Addr == nil {
		t.Fatalf("write to a closed peer: %v, want a *net.OpError naming the connection", werr)
	}
}
