package logship_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/enclave/logship"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// stalledHost accepts one connection, never reads it, and accepts no
// other: a host that hangs.
func stalledHost(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		_ = l.Close()
		if err != nil {
			close(accepted)
			return
		}
		_ = c.(*net.TCPConn).SetReadBuffer(4096) // fills at once
		accepted <- c
	}()
	t.Cleanup(func() {
		_ = l.Close()
		if c, ok := <-accepted; ok {
			_ = c.Close()
		}
	})
	return l.Addr().String()
}

// Signing never waits for a log line: the real enclave graph logs every
// call (debug level) to a shipper whose host accepts and never reads; every
// Sign is answered in time, and the shipper drops and counts what the host
// did not take.
func TestSigningNeverWaitsForTheHost(t *testing.T) {
	addr := stalledHost(t)
	ship, err := logship.New(logship.Config{
		Dial: func(ctx context.Context) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			if err == nil {
				_ = c.(*net.TCPConn).SetWriteBuffer(4096)
			}
			return c, err
		},
		MaxBuffer:    64 << 10,
		WriteTimeout: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = ship.Close(ctx)
	}()
	core, logs := observer.New(zap.DebugLevel)
	log := zap.New(zapcore.NewTee(core, ship.Core(zap.DebugLevel)))
	e, err := enclavetest.Run(enclavetest.DefaultConfig(), log, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.Stop() }()
	cc, err := grpc.NewClient(e.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	signer := pb.NewSignerServiceClient(cc)
	ecc := &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}
	for i := range 2000 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := signer.Sign(ctx, &pb.SignRequest{Key: ecc, Message: []byte("m")})
		cancel()
		if err != nil {
			t.Fatalf("Sign %d beside a host that does not read the logs: %v", i, err)
		}
	}
	if logs.FilterMessage("call").Len() < 2000 {
		t.Fatalf("%d call lines logged: the test needs one per call (debug level)", logs.FilterMessage("call").Len())
	}
	deadline := time.Now().Add(10 * time.Second)
	for ship.Dropped() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("nothing dropped: the host took %d lines, the test did not stall it", ship.Shipped())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("2000 Signs answered; log lines shipped %d, dropped %d", ship.Shipped(), ship.Dropped())
}

// A host that accepts but never reads costs the writer nothing: writes
// time out, the sender redials, lines are dropped and counted.
func TestStalledHostDoesNotBlock(t *testing.T) {
	addr := stalledHost(t)
	s, err := logship.New(logship.Config{
		Dial:         func(ctx context.Context) (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, "tcp", addr) },
		MaxBuffer:    64 << 10,
		WriteTimeout: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.Close(ctx)
	}()
	line := []byte(`{"msg":"` + strings.Repeat("y", 1000) + `"}` + "\n")
	start := time.Now()
	for range 20_000 { // 20 MB: far more than the socket buffers hold
		_, _ = s.Write(line)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("writes beside a stalled host took %v", d)
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.Dropped() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("nothing dropped beside a host that does not read")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Flush ends by its deadline whatever the host does.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := s.Flush(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Flush beside a stalled host = %v", err)
	}
}

// A host that goes away (its connection closed) is redialled: later lines
// arrive on a new connection.
func TestHostGoneIsRedialled(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lines := make(chan string, 1000)
	conns := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns <- c
			go func() {
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					lines <- sc.Text()
				}
			}()
		}
	}()
	ship, err := logship.New(logship.Config{Dial: func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", l.Addr().String())
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = ship.Close(ctx)
	}()
	_, _ = ship.Write([]byte(`{"msg":"first"}` + "\n"))
	if got := <-lines; !strings.Contains(got, "first") {
		t.Fatalf("first line: %q", got)
	}
	first := <-conns
	_ = first.Close() // the host restarts
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, _ = ship.Write([]byte(`{"msg":"later"}` + "\n"))
		select {
		case got := <-lines:
			if strings.Contains(got, "later") {
				select {
				case <-conns:
				default:
					t.Fatal("a later line arrived, but not on a new connection")
				}
				return
			}
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no line arrived after the host closed its connection")
		}
	}
}
