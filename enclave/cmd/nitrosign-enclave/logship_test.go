package main

import (
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/host/enclavelog"
)

// A start-up failure reaches the host's receiver, before any gRPC server
// is up: the binary is run with a listener that cannot bind (a CID that is
// not this machine's) and, without the simulated NSM, no /dev/nsm either.
func TestStartupFailureIsShipped(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	r := enclavelog.New(enclavelog.Config{}, zap.New(core))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- r.Serve(l) }()
	defer func() {
		_ = l.Close()
		<-served
		r.Close()
	}()
	code := run([]string{"--cid", "4000000", "--port", "5999", "--log-format", "console", "--log-ship", "tcp://" + l.Addr().String()})
	if code != 1 {
		t.Fatalf("exit status %d, want 1 (start-up failed)", code)
	}
	deadline := time.Now().Add(10 * time.Second)
	for logs.FilterMessage("start-up failed").Len() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the start-up failure did not reach the host; it got: %v", logs.All())
		}
		time.Sleep(10 * time.Millisecond)
	}
	e := logs.FilterMessage("start-up failed").All()[0]
	if e.Level != zapcore.ErrorLevel || !strings.HasPrefix(e.LoggerName, "enclave") {
		t.Fatalf("entry %+v", e.Entry)
	}
	if msg, _ := e.ContextMap()["error"].(string); msg == "" {
		t.Fatalf("no cause in the shipped line: %v", e.ContextMap())
	}
	t.Logf("shipped: %s: %v", e.Message, e.ContextMap()["error"])
	// The lines are JSON at the host even though the enclave's own output
	// was console text.
	if _, ok := e.ContextMap()["enclave_ts"].(time.Time); !ok {
		t.Fatalf("no enclave timestamp: %v", e.ContextMap())
	}
}
