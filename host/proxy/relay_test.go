package proxy_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/host/proxy"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// rawClient is a bare HTTP/2 client of the proxy that does only what a
// test tells it to: it never reads unless asked and never returns window.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
	next uint32
}

// newRawClient connects and sends the preface with initialWindow as its
// streams' receive window.
func newRawClient(t *testing.T, addr string, initialWindow uint32) *rawClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	rc := &rawClient{t: t, conn: c, fr: http2.NewFramer(c, c), next: 1}
	rc.enc = hpack.NewEncoder(&rc.hbuf)
	if _, err := c.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: initialWindow}); err != nil {
		t.Fatal(err)
	}
	return rc
}

// call opens a stream for method with msg as its only request message.
func (rc *rawClient) call(method string, msg proto.Message) uint32 {
	rc.t.Helper()
	id := rc.headers(method)
	b, err := proto.Marshal(msg)
	if err != nil {
		rc.t.Fatal(err)
	}
	body := append([]byte{0, byte(len(b) >> 24), byte(len(b) >> 16), byte(len(b) >> 8), byte(len(b))}, b...)
	if err := rc.fr.WriteData(id, true, body); err != nil {
		rc.t.Fatal(err)
	}
	return id
}

// headers opens a stream for method with a gRPC request's headers (and
// extra), no request body yet.
func (rc *rawClient) headers(method string, extra ...hpack.HeaderField) uint32 {
	rc.t.Helper()
	rc.hbuf.Reset()
	for _, f := range append([]hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: method}, {Name: ":authority", Value: "proxy"},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"},
	}, extra...) {
		_ = rc.enc.WriteField(f)
	}
	id := rc.next
	rc.next += 2
	if err := rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.hbuf.Bytes(), EndHeaders: true}); err != nil {
		rc.t.Fatal(err)
	}
	return id
}

// countActive makes the upstream's StreamingOutputCall send its responses
// and counts the handlers running.
func countActive(h *harness) *atomic.Int32 {
	var n atomic.Int32
	h.up.Test.StreamingOutputCallF.Set(func(req *testpb.StreamingOutputCallRequest, stream testpb.TestService_StreamingOutputCallServer) error {
		n.Add(1)
		defer n.Add(-1)
		for _, p := range req.GetResponseParameters() {
			if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: &testpb.Payload{Body: make([]byte, p.GetSize())}}); err != nil {
				return err
			}
		}
		return nil
	})
	return &n
}

// A client that stops reading its responses (it gives no flow-control
// window) holds up only its own stream: calls of other clients on the
// same upstream connection go on, and the proxy buffers no more than the
// stream's window for it.
func TestStalledClientDoesNotStallTheLane(t *testing.T) {
	h := newHarness(t, harnessOpts{poolSize: 1})
	h.waitAllReady(t)
	active := countActive(h)
	const respSize = 64 << 10
	raw := newRawClient(t, h.addr, 0) // no window: not a byte of DATA may reach it
	params := make([]*testpb.ResponseParameters, 64)
	for i := range params {
		params[i] = &testpb.ResponseParameters{Size: respSize}
	}
	// 4 MiB of responses for a client that takes none.
	raw.call("/grpc.testing.TestService/StreamingOutputCall", &testpb.StreamingOutputCallRequest{ResponseParameters: params})

	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	for i := range 50 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{Payload: bytes.Repeat([]byte("x"), 100_000)})
		cancel()
		if err != nil {
			t.Fatalf("Echo %d beside a stalled stream on the same lane: %v", i, err)
		}
	}
	// The stalled stream is still open: the upstream handler is blocked
	// by flow control, not finished.
	if n := active.Load(); n != 1 {
		t.Errorf("%d streaming handlers active upstream, want 1 (blocked by flow control)", n)
	}
	_ = raw.conn.Close()
	eventually(t, 10*time.Second, "stalled stream cancelled upstream after its client left", func() bool {
		return active.Load() == 0
	})
}

// A client that opens a window but never reads its socket costs the proxy
// at most a stream window per call plus clientSendCap (the rest of the
// responses wait upstream, by flow control), its calls stay open upstream
// until keepalive finds the client gone, and the proxy and its other
// clients carry on meanwhile.
func TestClientThatNeverReadsIsClosed(t *testing.T) {
	h := newHarness(t, harnessOpts{poolSize: 1, mutate: func(c *proxy.Config) {
		c.Limits.KeepaliveTime, c.Limits.KeepaliveTimeout = 3*time.Second, time.Second
	}})
	h.waitAllReady(t)
	active := countActive(h)
	raw := newRawClient(t, h.addr, 1<<31-1)
	if err := raw.fr.WriteWindowUpdate(0, 1<<31-1-65535); err != nil {
		t.Fatal(err)
	}
	params := make([]*testpb.ResponseParameters, 200)
	for i := range params {
		params[i] = &testpb.ResponseParameters{Size: 1 << 20}
	}
	for range 4 {
		raw.call("/grpc.testing.TestService/StreamingOutputCall", &testpb.StreamingOutputCallRequest{ResponseParameters: params})
	}
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	// The client never reads; the proxy must give up on it (its handlers
	// upstream are cancelled) while serving the others.
	eventually(t, 10*time.Second, "the 4 streams running upstream", func() bool { return active.Load() == 4 })
	deadline := time.Now().Add(30 * time.Second)
	var most int64
	for active.Load() > 0 {
		// 4 streams' windows, the client's send cap, and a frame or two.
		if b := h.proxy.Buffered(); b > most {
			most = b
			if b > 4*256<<10+256<<10+64<<10 {
				t.Fatalf("the proxy buffers %d bytes for a client that never reads", b)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("x")})
		cancel()
		if err != nil {
			t.Fatalf("Echo beside a client that never reads: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the proxy kept a connection whose client never reads (%d handlers active)", active.Load())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !closedByPeer(raw.conn) {
		t.Fatal("handlers ended but the connection is still open")
	}
	t.Logf("most buffered for the client that never reads: %d bytes", most)
}

// closedByPeer reports whether the proxy closed c: only called once the
// test no longer needs c, as it reads (and drops) what c holds.
func closedByPeer(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err := io.Copy(io.Discard, c)
	return err == nil || !isTimeout(err)
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// An upstream connection that has used up its stream ids drains and is
// replaced; no call fails on the way and readiness comes back.
func TestLaneReplacedWhenStreamIDsRunOut(t *testing.T) {
	defer proxy.SetLastLaneStreamID(9)() // five streams per connection
	h := newHarness(t, harnessOpts{poolSize: 1})
	h.waitAllReady(t)
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	for i := range 40 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("x")}, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Fatalf("Echo %d across connection replacements: %v", i, err)
		}
		// A client that does not wait for readiness would see the moment
		// between the old connection and the new one; wait for it here.
		eventually(t, 5*time.Second, "upstream slot ready again", func() bool { return h.proxy.Ready() == 1 })
	}
	if n := len(h.up.Peers()); n < 8 {
		t.Errorf("upstream saw %d connections carry calls, want >= 8 (one per 5 calls)", n)
	}
}

// A WINDOW_UPDATE of 0 on a stream is a stream error: the stream is reset
// and its call ends, upstream too; the connection serves on.
func TestZeroWindowUpdateEndsTheCall(t *testing.T) {
	h := newHarness(t, harnessOpts{poolSize: 1})
	h.waitAllReady(t)
	active := countActive(h)
	raw := newRawClient(t, h.addr, 0)
	params := []*testpb.ResponseParameters{{Size: 1 << 20}, {Size: 1 << 20}}
	id := raw.call("/grpc.testing.TestService/StreamingOutputCall", &testpb.StreamingOutputCallRequest{ResponseParameters: params})
	eventually(t, 5*time.Second, "the stream running upstream", func() bool { return active.Load() == 1 })
	// x/net/http2 refuses to write an increment of 0: by hand.
	if err := raw.fr.WriteRawFrame(http2.FrameWindowUpdate, 0, id, []byte{0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the upstream handler cancelled", func() bool { return active.Load() == 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
}

// A PING acknowledgement may wait for the response a client's open call
// is about to get, so that the two leave in one write; it never waits for
// long: a call whose response is slow does not hold it.
func TestPingAnsweredWhileACallIsOpen(t *testing.T) {
	h := newHarness(t, harnessOpts{poolSize: 1})
	h.waitAllReady(t)
	release, entered := make(chan struct{}), make(chan struct{}, 1)
	h.up.Test.StreamingOutputCallF.Set(func(req *testpb.StreamingOutputCallRequest, stream testpb.TestService_StreamingOutputCallServer) error {
		entered <- struct{}{}
		select {
		case <-release:
		case <-stream.Context().Done():
		}
		return stream.Send(&testpb.StreamingOutputCallResponse{})
	})
	defer close(release)
	raw := newRawClient(t, h.addr, 1<<20)
	id := raw.call("/grpc.testing.TestService/StreamingOutputCall", &testpb.StreamingOutputCallRequest{
		ResponseParameters: []*testpb.ResponseParameters{{Size: 1}},
	})
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the call did not reach the upstream")
	}
	data := [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	sent := time.Now()
	if err := raw.fr.WritePing(false, data); err != nil {
		t.Fatal(err)
	}
	_ = raw.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := raw.fr.ReadFrame()
		if err != nil {
			t.Fatalf("no PING ACK while the call is open: %v", err)
		}
		switch f := f.(type) {
		case *http2.PingFrame:
			if !f.IsAck() || f.Data != data {
				continue
			}
			// The bound is lazyDelay (5 ms); allow for a loaded machine,
			// but far less than the call, which is still open.
			if d := time.Since(sent); d > time.Second {
				t.Fatalf("PING ACK after %v", d)
			}
			return
		case *http2.HeadersFrame, *http2.DataFrame:
			if f.Header().StreamID == id {
				t.Fatal("the call's response came first: the handler is still blocked, so the proxy answered it")
			}
		}
	}
}

// A max-age grace of 0 lets the calls of an aged-out connection finish
// however long they take (grpc-go's meaning, and the flag's).
func TestMaxAgeGraceZeroLetsCallsFinish(t *testing.T) {
	h := newHarness(t, harnessOpts{poolSize: 1, mutate: func(c *proxy.Config) {
		c.Limits.MaxConnectionAge, c.Limits.MaxConnectionAgeGrace = 200*time.Millisecond, 0
	}})
	h.waitAllReady(t)
	h.up.Test.StreamingOutputCallF.Set(func(req *testpb.StreamingOutputCallRequest, stream testpb.TestService_StreamingOutputCallServer) error {
		time.Sleep(1500 * time.Millisecond) // well past the age (+10% jitter)
		return stream.Send(&testpb.StreamingOutputCallResponse{})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := testpb.NewTestServiceClient(h.cc).StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{
		ResponseParameters: []*testpb.ResponseParameters{{Size: 1}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatalf("a call on an aged-out connection with no grace limit was cut: %v", err)
	}
}

// The deadlines of one connection's calls share one timer: a deadline
// earlier than those already waiting still fires on time, each call gets
// DeadlineExceeded from the proxy no sooner than its own deadline and in
// deadline order, and a call that ended before its deadline is not
// answered again.
func TestProxyDeadlinesOnOneConnection(t *testing.T) {
	h := newHarness(t, harnessOpts{poolSize: 1})
	h.waitAllReady(t)
	raw := newRawClient(t, h.addr, 65535)
	const echo = "/nitrosign.v1.EchoService/Echo"
	sent := map[uint32]time.Time{}
	timeouts := map[uint32]time.Duration{}
	start := func(timeout string, d time.Duration) uint32 {
		id := raw.headers(echo, hpack.HeaderField{Name: "grpc-timeout", Value: timeout}) // held: no request yet
		sent[id], timeouts[id] = time.Now(), d
		return id
	}
	late := start("3S", 3*time.Second)
	mid := start("300m", 300*time.Millisecond)
	cancelled := start("200m", 200*time.Millisecond)
	if err := raw.fr.WriteRSTStream(cancelled, http2.ErrCodeCancel); err != nil {
		t.Fatal(err)
	}
	early := start("150m", 150*time.Millisecond)

	dec := hpack.NewDecoder(4096, nil)
	_ = raw.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	var order []uint32
	for len(order) < 3 {
		f, err := raw.fr.ReadFrame()
		if err != nil {
			t.Fatalf("after %v: %v", order, err)
		}
		hf, ok := f.(*http2.HeadersFrame)
		if !ok {
			continue
		}
		fields, err := dec.DecodeFull(hf.HeaderBlockFragment())
		if err != nil {
			t.Fatal(err)
		}
		id := hf.StreamID
		if id == cancelled {
			t.Fatalf("the call reset before its deadline was answered: %v", fields)
		}
		if waited := time.Since(sent[id]); waited < timeouts[id] {
			t.Fatalf("stream %d answered after %v, before its deadline of %v", id, waited, timeouts[id])
		}
		got := map[string]string{}
		for _, f := range fields {
			got[f.Name] = f.Value
		}
		if got["grpc-status"] != "4" || got["grpc-message"] != "deadline exceeded (proxy)" {
			t.Fatalf("stream %d: %v, want DeadlineExceeded from the proxy", id, got)
		}
		if id != late && time.Since(sent[late]) >= timeouts[late] {
			t.Fatalf("stream %d was answered only once the latest deadline had passed: its earlier deadline did not re-arm the timer", id)
		}
		order = append(order, id)
	}
	if want := []uint32{early, mid, late}; !slices.Equal(order, want) {
		t.Fatalf("answered in the order %v, want %v (deadline order)", order, want)
	}
}
