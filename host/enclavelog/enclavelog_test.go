package enclavelog

import (
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fixture struct {
	r    *Receiver
	addr string
	logs *observer.ObservedLogs
}

func start(t *testing.T, cfg Config) *fixture {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	r := New(cfg, zap.New(core))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- r.Serve(l) }()
	t.Cleanup(func() {
		_ = l.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		r.Close()
	})
	return &fixture{r: r, addr: l.Addr().String(), logs: logs}
}

func (f *fixture) send(t *testing.T, lines ...string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	for _, l := range lines {
		if _, err := c.Write([]byte(l)); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func (f *fixture) wait(t *testing.T, n int) []observer.LoggedEntry {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for f.logs.Len() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d log entries, want %d: %v", f.logs.Len(), n, f.logs.All())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return f.logs.All()
}

// A zap JSON line comes out as the same entry: level, message, logger
// name, time and fields, plus who sent it.
func TestLinesKeepTheirFields(t *testing.T) {
	f := start(t, Config{})
	f.send(t,
		`{"level":"error","ts":1796266743.5,"logger":"server","caller":"server/server.go:10","msg":"start-up failed","error":"open /dev/nsm: no such file","attempt":2}`+"\n",
		`{"level":"debug","ts":1796266744,"msg":"call","method":"/nitrosign.v1.SignerService/Sign","ok":true}`+"\n",
	)
	got := f.wait(t, 2)
	e := got[0]
	if e.Level != zapcore.ErrorLevel || e.Message != "start-up failed" || e.LoggerName != "enclave.server" {
		t.Fatalf("entry %+v", e.Entry)
	}
	m := e.ContextMap()
	if m["error"] != "open /dev/nsm: no such file" || m["attempt"] != float64(2) || m["enclave_caller"] != "server/server.go:10" {
		t.Fatalf("fields %v", m)
	}
	if ts, ok := m["enclave_ts"].(time.Time); !ok || ts.Unix() != 1796266743 {
		t.Fatalf("enclave_ts %v", m["enclave_ts"])
	}
	if !strings.HasPrefix(m["enclave_peer"].(string), "127.0.0.1:") {
		t.Fatalf("no sender: %v", m)
	}
	if got[1].Level != zapcore.DebugLevel || got[1].LoggerName != "enclave" || got[1].ContextMap()["ok"] != true {
		t.Fatalf("second entry %+v %v", got[1].Entry, got[1].ContextMap())
	}
}

// Bad input is reported and costs nothing else: text, oversized lines,
// levels that would stop the host.
func TestBadLines(t *testing.T) {
	f := start(t, Config{MaxLine: 1024})
	f.send(t,
		"not json at all "+strings.Repeat("z", 2000)[:600]+"\n",
		`{"level":"info","msg":"`+strings.Repeat("a", 5000)+`"}`+"\n",
		`{"level":"fatal","msg":"the enclave gives up"}`+"\n",
		`{"level":"panic","msg":"and panics"}`+"\n",
		`{"level":"loud","msg":"unknown level"}`+"\n",
		`[1,2,3]`+"\n",
		`{"level":"info","msg":"still served"}`+"\n",
	)
	got := f.wait(t, 7)
	if got[0].Message != "enclave sent a log line that is not a JSON object" || len(got[0].ContextMap()["line"].(string)) != maxTextLine {
		t.Fatalf("text line: %+v %v", got[0].Entry, got[0].ContextMap())
	}
	want := []struct {
		lvl zapcore.Level
		msg string
	}{
		{zapcore.ErrorLevel, "the enclave gives up"}, // fatal: capped, the host goes on
		{zapcore.ErrorLevel, "and panics"},
		{zapcore.InfoLevel, "unknown level"},
		{zapcore.WarnLevel, "enclave sent a log line that is not a JSON object"},
		{zapcore.InfoLevel, "still served"},
	}
	// The oversized line is reported at once, where it was.
	if e := got[1]; e.Message != "enclave log lines dropped by the host" || e.ContextMap()["over_size"] != uint64(1) {
		t.Fatalf("oversized line not reported: %+v %v", e.Entry, e.ContextMap())
	}
	for i, w := range want {
		if e := got[2+i]; e.Level != w.lvl || e.Message != w.msg {
			t.Errorf("entry %d: %v %q, want %v %q", 2+i, e.Level, e.Message, w.lvl, w.msg)
		}
	}
}

// A connection that logs faster than the rate gets its excess dropped and
// counted; the host's log stays bounded.
func TestRateLimited(t *testing.T) {
	f := start(t, Config{LinesPerSec: 1, LinesBurst: 10})
	var b strings.Builder
	for range 500 {
		b.WriteString(`{"level":"info","msg":"flood"}` + "\n")
	}
	c := f.send(t, b.String())
	time.Sleep(100 * time.Millisecond)
	_ = c.Close()
	count := func() (logged int, dropped uint64) {
		for _, e := range f.logs.FilterMessage("enclave log lines dropped by the host").All() {
			dropped += e.ContextMap()["over_rate"].(uint64)
		}
		return f.logs.FilterMessage("flood").Len(), dropped
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		logged, dropped := count()
		if logged+int(dropped) == 500 {
			if logged < 10 || logged > 12 {
				t.Fatalf("%d lines logged, want the burst of 10 (+1 a second)", logged)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d logged + %d reported dropped, want 500 in all", logged, dropped)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Close ends the connections that are still open.
func TestCloseEndsConnections(t *testing.T) {
	f := start(t, Config{})
	c := f.send(t, `{"msg":"hello"}`+"\n")
	f.wait(t, 1)
	f.r.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after Close")
	}
}

// A line cannot pose as another sender: its own enclave_* keys are kept
// under field_*, beside the host's.
func TestLineCannotSetTheSender(t *testing.T) {
	f := start(t, Config{})
	f.send(t, `{"level":"info","msg":"posing","enclave_cid":16,"enclave_peer":"vsock 16"}`+"\n")
	m := f.wait(t, 1)[0].ContextMap()
	if m["field_enclave_cid"] != float64(16) || m["field_enclave_peer"] != "vsock 16" ||
		!strings.HasPrefix(m["enclave_peer"].(string), "127.0.0.1:") || m["enclave_cid"] != nil {
		t.Fatalf("fields %v", m)
	}
}

// A connection that sends nothing is closed after IdleTimeout: silent
// connections cannot hold the slots.
func TestIdleConnectionClosed(t *testing.T) {
	f := start(t, Config{IdleTimeout: 200 * time.Millisecond})
	c := f.send(t)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := c.Read(make([]byte, 1)); err == nil || time.Since(start) > 4*time.Second {
		t.Fatalf("idle connection not closed: %v after %v", err, time.Since(start))
	}
}
