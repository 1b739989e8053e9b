package proxy

import (
	"bytes"
	"encoding/base64"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

func TestGRPCTimeout(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"1n", time.Nanosecond, true},
		{"100m", 100 * time.Millisecond, true},
		{"30S", 30 * time.Second, true},
		{"2M", 2 * time.Minute, true},
		{"1H", time.Hour, true},
		{"99999999u", 99999999 * time.Microsecond, true},
		{"", 0, false},
		{"S", 0, false},
		{"soon", 0, false},
		{"-1S", 0, false},
		{"1x", 0, false},
		{"123456789S", 0, false}, // more than 8 digits
	} {
		got, ok := parseTimeout(tt.in)
		if ok != tt.ok || (ok && got != tt.want) {
			t.Errorf("parseTimeout(%q) = %v, %v; want %v, %v", tt.in, got, ok, tt.want, tt.ok)
		}
	}
	// What formatTimeout writes parses back to at least the duration
	// (rounded up, never shortened) and fits the 8-digit limit.
	for _, d := range []time.Duration{1, 999, time.Microsecond + 1, 100 * time.Millisecond, 30 * time.Second,
		99999999 * time.Nanosecond, 100000000 * time.Nanosecond, 36 * time.Hour, 1<<63 - 1} {
		s := formatTimeout(d)
		got, ok := parseTimeout(s)
		if !ok || got < d {
			t.Errorf("formatTimeout(%v) = %q, parses to %v, %v", d, s, got, ok)
		}
		if len(s) > 9 {
			t.Errorf("formatTimeout(%v) = %q: more than 8 digits", d, s)
		}
	}
}

func TestEncodeGrpcMessage(t *testing.T) {
	for in, want := range map[string]string{
		"plain message":      "plain message",
		"100% sure":          "100%25 sure",
		"caf\u00e9":          "caf%C3%A9",
		"line\nbreak":        "line%0Abreak",
		"":                   "",
		"tilde ~ and space ": "tilde ~ and space ",
	} {
		if got := encodeGrpcMessage(in); got != want {
			t.Errorf("encodeGrpcMessage(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestValidBinHeader(t *testing.T) {
	long := base64.StdEncoding.EncodeToString(make([]byte, 3000))
	for in, want := range map[string]bool{
		"":                              true,
		"AQID":                          true, // padded, length 4
		"AQI=":                          true,
		"AQI":                           true, // unpadded
		"!!!":                           false,
		"AQ=D":                          false,
		long:                            true,
		long[:len(long)-1]:              true, // unpadded of a longer value
		long[:1000] + "*" + long[1001:]: false,
	} {
		if got := validBinHeader(in); got != want {
			t.Errorf("validBinHeader(%.20q...) = %v, want %v", in, got, want)
		}
	}
}

func TestIsGRPCContentType(t *testing.T) {
	for in, want := range map[string]bool{
		"application/grpc":             true,
		"application/grpc+proto":       true,
		"application/grpc;charset=utf": true,
		"application/grpcx":            false,
		"application/json":             false,
		"":                             false,
	} {
		if got := isGRPCContentType(in); got != want {
			t.Errorf("isGRPCContentType(%q) = %v, want %v", in, got, want)
		}
	}
}

// msgLimit follows message boundaries across frames of any split and
// refuses exactly the messages over the limit.
func TestMsgLimit(t *testing.T) {
	msg := func(n int) []byte {
		return append([]byte{0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, make([]byte, n)...)
	}
	stream := append(append(append([]byte{}, msg(10)...), msg(100)...), msg(0)...)
	for split := 1; split <= len(stream); split++ {
		var m msgLimit
		for i := 0; i < len(stream); i += split {
			if err := m.check(stream[i:min(i+split, len(stream))], 100); err != nil {
				t.Fatalf("split %d: %v", split, err)
			}
		}
		var over msgLimit
		var err error
		big := append(append([]byte{}, msg(10)...), msg(101)...)
		for i := 0; i < len(big) && err == nil; i += split {
			err = over.check(big[i:min(i+split, len(big))], 100)
		}
		if err == nil || !strings.Contains(err.Error(), "(101 vs. 100)") {
			t.Fatalf("split %d: 101-byte message against a 100-byte limit: %v", split, err)
		}
	}
}

// Data beyond the windows is queued and sent, in order and with the end
// of stream last, as window arrives.
func TestHalfFlowControl(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	e := newEndpoint(a, nil)
	var sentBytes int
	var ended bool
	h := &half{dst: e, id: 1, window: 10, onSent: func(n int, end bool) { sentBytes += n; ended = ended || end }}
	e.mu.Lock()
	e.window = 15
	n, end := h.sendLocked([]byte("0123456789abcdef"), false, nil) // 16 bytes, stream window 10
	if n != 10 || end {
		t.Fatalf("first send: %d bytes, end %v; want 10, false", n, end)
	}
	n, end = h.sendLocked([]byte("XYZ"), true, nil) // queued behind
	if n != 0 || end || len(h.q) != 1 || !h.qEnd {  // gathered into one chunk
		t.Fatalf("second send: %d bytes, end %v, queue %d, qEnd %v", n, end, len(h.q), h.qEnd)
	}
	list, err := e.addWindowLocked(h, 100) // connection window (5 left) now limits
	if err != nil || len(list) != 1 || list[0].n != 5 || list[0].ended {
		t.Fatalf("after stream window: %+v, %v", list, err)
	}
	list, err = e.addWindowLocked(nil, 100)
	if err != nil || len(list) != 1 || list[0].n != 4 || !list[0].ended {
		t.Fatalf("after connection window: %+v, %v", list, err)
	}
	if !h.closed || len(h.q) != 0 {
		t.Fatal("stream not closed after its end went out")
	}
	if _, err := e.addWindowLocked(nil, 1<<31); err == nil {
		t.Fatal("a window over 2^31-1 is a flow-control error")
	}
	e.mu.Unlock()
	// What went to the wire: DATA frames carrying the 19 bytes in order,
	// the last with END_STREAM.
	var got []byte
	fr := http2.NewFramer(nil, bytes.NewReader(e.buf.Bytes()))
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		df := f.(*http2.DataFrame)
		got = append(got, df.Data()...)
		if df.StreamEnded() != (len(got) == 19) {
			t.Fatalf("END_STREAM on the frame ending at byte %d", len(got))
		}
	}
	if string(got) != "0123456789abcdefXYZ" {
		t.Fatalf("relayed %q", got)
	}
}

// Many tiny DATA frames queued for a stream cost about their bytes, not
// a buffer each.
func TestQueueOfTinyFrames(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	var global account
	conn := account{parent: &global}
	e := newEndpoint(a, &conn)
	h := &half{dst: e, id: 1, window: 0, acct: &conn}
	e.mu.Lock()
	defer e.mu.Unlock()
	for range 100_000 {
		h.sendLocked([]byte{'x'}, false, nil)
	}
	total := 0
	for _, c := range h.q {
		total += len(c)
	}
	if total != 100_000 || len(h.q) > 100_000/queueChunk+1 {
		t.Fatalf("%d bytes in %d chunks", total, len(h.q))
	}
	// What is queued is charged to the connection and to the proxy, and
	// given back when the stream ends.
	if got := conn.load(); got != 100_000 || global.load() != 100_000 {
		t.Fatalf("charged %d to the connection, %d to the proxy; want 100000", got, global.load())
	}
	h.resetLocked(http2.ErrCodeCancel)
	if got, want := conn.load(), int64(e.queuedLocked()); got != want || global.load() != want {
		t.Fatalf("after reset: connection %d, proxy %d; want %d (the RST_STREAM frame)", got, global.load(), want)
	}
}

// A receive window: what the peer sends is taken from it, what the proxy
// consumed goes back in batches of a quarter window, and a peer that
// sends more than it was given is caught.
func TestInflow(t *testing.T) {
	w := newInflow(1000)
	if !w.take(600) || !w.take(400) {
		t.Fatal("1000 bytes within a 1000-byte window refused")
	}
	if got := w.give(249); got != 0 {
		t.Fatalf("credit for 249 bytes returned at once (%d): batches are a quarter window", got)
	}
	if got := w.give(1); got != 250 {
		t.Fatalf("credit after 250 bytes consumed = %d, want 250", got)
	}
	if !w.take(250) {
		t.Fatal("the 250 bytes given back could not be sent")
	}
	if w.take(1) {
		t.Fatal("a byte beyond the window was accepted")
	}
	w.reset()
	if !w.take(1000) || w.give(0) != 0 {
		t.Fatal("reset did not restore the whole window")
	}
}

// TestLazyAckNeverLeavesEarly: deferred acknowledgements leave with the
// next write; the timer that bounds their wait stays armed after that
// write (arming one per call would cost a thread wake-up per call), and
// when it fires it flushes only acknowledgements that waited lazyDelay
// since their own deferral: a later one is neither sent early and alone
// nor left behind.
func TestLazyAckNeverLeavesEarly(t *testing.T) {
	a, b := tcpPair(t)
	e := newEndpoint(a, &account{})
	data := [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	e.ping(true, data)
	if !e.deferLazy() {
		t.Fatal("a lone PING acknowledgement was not deferred")
	}
	// The response it waited for: both leave in one write.
	e.mu.Lock()
	_ = e.fr.WriteData(1, true, []byte("response"))
	e.mu.Unlock()
	e.flushNow()
	fr := http2.NewFramer(nil, b)
	_ = b.SetReadDeadline(time.Now().Add(5 * time.Second))
	for _, want := range []http2.FrameType{http2.FramePing, http2.FrameData} {
		f, err := fr.ReadFrame()
		if err != nil || f.Header().Type != want {
			t.Fatalf("read %v, %v; want %v", f, err, want)
		}
	}
	// A second acknowledgement, deferred while the first one's timer
	// still runs: it waits its own lazyDelay, then leaves on its own.
	time.Sleep(lazyDelay / 2)
	e.ping(true, data)
	deferred := time.Now()
	if !e.deferLazy() {
		t.Fatal("a second acknowledgement was not deferred")
	}
	f, err := fr.ReadFrame()
	if pf, ok := f.(*http2.PingFrame); err != nil || !ok || !pf.IsAck() {
		t.Fatalf("the deferred acknowledgement never left on its own: %v, %v", f, err)
	}
	if waited := time.Since(deferred); waited < lazyDelay {
		t.Fatalf("the acknowledgement left %v after it was deferred, before lazyDelay (%v)", waited, lazyDelay)
	}
	e.fail(net.ErrClosed)
}
