package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/host/bench"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestL4RelayUsage(t *testing.T) {
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"l4relay", "-h"}, 0, "io.Copy"},
		{[]string{"l4relay", "--listen", "0.0.0.0:7004"}, 2, "loopback only"},
		{[]string{"l4relay", "--upstream", "10.0.0.1:7001"}, 2, "loopback only"},
		{[]string{"l4relay", "extra"}, 2, "unexpected argument"},
		{[]string{"l4relay", "--busy", "-1us"}, 2, "between 0 and 10ms"},
		{[]string{"l4relay", "--busy", "1s"}, 2, "between 0 and 10ms"},
	} {
		code, _, stderr := runArgs(t, tt.args...)
		if code != tt.code || !strings.Contains(stderr, tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d saying %q", tt.args, code, stderr, tt.code, tt.want)
		}
	}
}

// TestL4Relay relays ping-pongs to tcp-echo, closes the client's side when
// the upstream ends, and closes every connection when stopped.
func TestL4Relay(t *testing.T) {
	t.Run("io.Copy", func(t *testing.T) { testL4Relay(t, 0) })
	// The calibration relay: read, a busy loop, write.
	t.Run("busy", func(t *testing.T) { testL4Relay(t, 50*time.Microsecond) })
}

func testL4Relay(t *testing.T, busy time.Duration) {
	echoAddr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	echoDone := make(chan int)
	go func() { echoDone <- run(ctx, []string{"tcp-echo", "--listen", echoAddr}, io.Discard, io.Discard) }()

	relayCtx, stopRelay := context.WithCancel(context.Background())
	defer stopRelay()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	relayDone := make(chan error)
	go func() { relayDone <- bench.L4Relay(relayCtx, l, echoAddr, busy) }()

	var c net.Conn
	msg, buf := []byte("0123456789abcdef0123456789abcdef"), make([]byte, 32)
	for range 50 { // until the echo listens
		c, err = net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err = c.Write(msg); err == nil {
			if _, err = io.ReadFull(c, buf); err == nil {
				break
			}
		}
		c.Close()
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	for range 100 {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Fatalf("echo through the relay: %q, %v", buf, err)
		}
	}
	if code := run(context.Background(), []string{"tcp-pingpong", "--target", l.Addr().String(), "--count", "100"}, io.Discard, io.Discard); code != 0 {
		t.Fatalf("tcp-pingpong through the relay: exit %d", code)
	}

	// Stopping closes the connections still relayed and returns.
	stopRelay()
	select {
	case err := <-relayDone:
		if err != nil {
			t.Fatalf("l4relay: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("l4relay did not return after its context ended")
	}
	if _, err := c.Read(buf); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("read after the relay stopped: %v, want EOF", err)
	}
	c.Close()
	if c, err := net.DialTimeout("tcp", l.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("the relay still accepts after it stopped")
	}
	cancel()
	if code := <-echoDone; code != 0 {
		t.Fatalf("tcp-echo exited %d", code)
	}
}

// TestL4RelayClosesBothSides: when either side of a relayed connection
// ends, the relay closes the other; stopping it closes the idle ones.
func TestL4RelayClosesBothSides(t *testing.T) {
	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	relayDone := make(chan error)
	go func() { relayDone <- bench.L4Relay(ctx, l, up.Addr().String(), 0) }()
	// pair opens a client connection through the relay and returns it with
	// the upstream's end of it.
	pair := func() (client, server net.Conn) {
		t.Helper()
		client, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		up.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		server, err = up.Accept()
		if err != nil {
			t.Fatalf("the relay did not dial the upstream: %v", err)
		}
		return client, server
	}
	eof := func(c net.Conn, who string) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
			t.Fatalf("%s: read %v, want EOF", who, err)
		}
	}

	c1, s1 := pair()
	defer c1.Close()
	s1.Close()
	eof(c1, "client after the upstream closed")

	c2, s2 := pair()
	defer s2.Close()
	c2.Close()
	eof(s2, "upstream after the client closed")

	c3, s3 := pair()
	defer c3.Close()
	defer s3.Close()
	stop()
	if err := <-relayDone; err != nil {
		t.Fatal(err)
	}
	eof(c3, "client after the relay stopped")
	eof(s3, "upstream after the relay stopped")
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}
