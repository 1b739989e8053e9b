package reliability_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2 is a raw HTTP/2 client: it puts exactly the frames a test wants on the
// wire (what grpc-go's client refuses to send: invalid metadata, 10,000
// streams without waiting, oversized header blocks) and records what the
// server answers, stream by stream.
type h2 struct {
	tb   testing.TB
	conn net.Conn
	fr   *http2.Framer

	wmu  sync.Mutex // guards fr writes, henc, hbuf, next
	henc *hpack.Encoder
	hbuf bytes.Buffer
	next uint32

	mu       sync.Mutex
	streams  map[uint32]*h2stream
	goaway   *h2goaway
	closed   error // set when the reader saw the connection end
	pingAcks int
	settings map[http2.SettingID]uint32
	done     chan struct{}
}

// h2stream is what the server answered on one stream.
type h2stream struct {
	httpStatus  string
	grpcStatus  int // -1: none
	grpcMessage string
	rst         bool
	rstCode     http2.ErrCode
	data        int
	ended       bool
}

type h2goaway struct {
	code   http2.ErrCode
	debug  string
	lastID uint32
}

// h2opts tune newH2.
type h2opts struct {
	// silent: no reader goroutine; the client never reads, never answers a
	// ping or acknowledges settings (a half-open peer).
	silent bool
}

// newH2 connects to addr and sends the client preface, SETTINGS (large
// windows, so the server's answers are never flow-controlled) and a
// connection WINDOW_UPDATE.
func newH2(tb testing.TB, addr string, o h2opts) *h2 {
	tb.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		tb.Fatal(err)
	}
	h := &h2{tb: tb, conn: c, next: 1, streams: map[uint32]*h2stream{}, settings: map[http2.SettingID]uint32{}, done: make(chan struct{})}
	h.fr = http2.NewFramer(c, c)
	h.fr.ReadMetaHeaders = hpack.NewDecoder(65536, nil)
	h.fr.MaxHeaderListSize = 1 << 20
	h.fr.SetMaxReadFrameSize(1 << 24)
	h.henc = hpack.NewEncoder(&h.hbuf)
	tb.Cleanup(h.close)
	if _, err := c.Write([]byte(http2.ClientPreface)); err != nil {
		tb.Fatal(err)
	}
	h.write(func() error {
		return h.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	})
	h.write(func() error { return h.fr.WriteWindowUpdate(0, 1<<30) })
	if o.silent {
		close(h.done)
		return h
	}
	go h.read()
	return h
}

func (h *h2) close() {
	_ = h.conn.Close()
	<-h.done
}

// write runs one framer write under the write lock; a write error is
// recorded, not fatal (a server may close the connection under us, and the
// test checks that instead).
func (h *h2) write(f func() error) {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	if err := f(); err != nil {
		h.mu.Lock()
		if h.closed == nil {
			h.closed = fmt.Errorf("write: %w", err)
		}
		h.mu.Unlock()
	}
}

func (h *h2) read() {
	defer close(h.done)
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			h.mu.Lock()
			h.closed = err
			h.mu.Unlock()
			return
		}
		h.mu.Lock()
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = f.ForeachSetting(func(s http2.Setting) error { h.settings[s.ID] = s.Val; return nil })
				h.mu.Unlock()
				h.write(h.fr.WriteSettingsAck)
				continue
			}
		case *http2.MetaHeadersFrame:
			s := h.stream(f.StreamID)
			for _, hf := range f.Fields {
				switch hf.Name {
				case ":status":
					s.httpStatus = hf.Value
				case "grpc-status":
					s.grpcStatus, _ = strconv.Atoi(hf.Value)
				case "grpc-message":
					s.grpcMessage = hf.Value
				}
			}
			if f.StreamEnded() {
				s.ended = true
			}
		case *http2.DataFrame:
			s := h.stream(f.StreamID)
			s.data += len(f.Data())
			if f.StreamEnded() {
				s.ended = true
			}
		case *http2.RSTStreamFrame:
			s := h.stream(f.StreamID)
			s.rst, s.rstCode, s.ended = true, f.ErrCode, true
		case *http2.GoAwayFrame:
			h.goaway = &h2goaway{code: f.ErrCode, debug: string(f.DebugData()), lastID: f.LastStreamID}
		case *http2.PingFrame:
			if f.IsAck() {
				h.pingAcks++
			} else {
				data := f.Data
				h.mu.Unlock()
				h.write(func() error { return h.fr.WritePing(true, data) })
				continue
			}
		}
		h.mu.Unlock()
	}
}

func (h *h2) stream(id uint32) *h2stream {
	s, ok := h.streams[id]
	if !ok {
		s = &h2stream{grpcStatus: -1}
		h.streams[id] = s
	}
	return s
}

// hf is a header field.
func hf(name, value string) hpack.HeaderField { return hpack.HeaderField{Name: name, Value: value} }

// grpcHeaders are the request headers of a gRPC call to path; extra fields
// replace a default of the same name (a value of "" drops it) or are added.
func grpcHeaders(path string, extra ...hpack.HeaderField) []hpack.HeaderField {
	fields := []hpack.HeaderField{
		hf(":method", "POST"), hf(":scheme", "http"), hf(":path", path), hf(":authority", "localhost"),
		hf("content-type", "application/grpc"), hf("te", "trailers"),
	}
	drop := map[string]bool{}
	for _, e := range extra {
		replaced := false
		for i := range fields {
			if fields[i].Name == e.Name {
				fields[i].Value = e.Value
				replaced = true
				drop[e.Name] = e.Value == ""
			}
		}
		if !replaced {
			fields = append(fields, e)
		}
	}
	out := fields[:0]
	for _, f := range fields {
		if !drop[f.Name] {
			out = append(out, f)
		}
	}
	return out
}

// grpcFrame is one gRPC length-prefixed message, uncompressed.
func grpcFrame(msg []byte) []byte {
	b := make([]byte, 5+len(msg))
	binary.BigEndian.PutUint32(b[1:], uint32(len(msg)))
	copy(b[5:], msg)
	return b
}

// open sends HEADERS (and CONTINUATION frames when the block is larger
// than a frame) for a new stream, then body as DATA if not nil; end closes
// the client's side. It returns the stream id.
func (h *h2) open(fields []hpack.HeaderField, body []byte, end bool) uint32 {
	h.wmu.Lock()
	id := h.next
	h.next += 2
	h.hbuf.Reset()
	for _, f := range fields {
		_ = h.henc.WriteField(f)
	}
	block := h.hbuf.Bytes()
	h.wmu.Unlock()
	h.sendHeaders(id, block, end && body == nil)
	if body != nil {
		h.write(func() error { return h.fr.WriteData(id, end, body) })
	}
	return id
}

func (h *h2) sendHeaders(id uint32, block []byte, end bool) {
	const chunk = 16384 // the initial SETTINGS_MAX_FRAME_SIZE
	first := block
	if len(first) > chunk {
		first = block[:chunk]
	}
	rest := block[len(first):]
	h.write(func() error {
		return h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: end, EndHeaders: len(rest) == 0})
	})
	for len(rest) > 0 {
		n := min(len(rest), chunk)
		frag := rest[:n]
		rest = rest[n:]
		last := len(rest) == 0
		h.write(func() error { return h.fr.WriteContinuation(id, last, frag) })
	}
}

// call is a complete unary call: headers, one message, end of stream.
func (h *h2) call(path string, msg []byte, extra ...hpack.HeaderField) uint32 {
	return h.open(grpcHeaders(path, extra...), grpcFrame(msg), true)
}

// finish sends a message and ends a stream opened without a body.
func (h *h2) finish(id uint32, msg []byte) {
	h.write(func() error { return h.fr.WriteData(id, true, grpcFrame(msg)) })
}

func (h *h2) ping() {
	h.write(func() error { return h.fr.WritePing(false, [8]byte{1, 2, 3, 4, 5, 6, 7, 8}) })
}

// wait returns what stream id got once it ended, or fails after timeout.
func (h *h2) wait(id uint32, timeout time.Duration) h2stream {
	h.tb.Helper()
	var out h2stream
	eventually(h.tb, timeout, fmt.Sprintf("an answer on stream %d", id), func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		if s, ok := h.streams[id]; ok && s.ended {
			out = *s
			return true
		}
		return h.closed != nil
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	if s, ok := h.streams[id]; ok && s.ended {
		return *s
	}
	h.tb.Fatalf("connection closed (%v) before stream %d ended; goaway %+v", h.closed, id, h.goaway)
	return out
}

// waitClosed waits until the server closes the connection (the reader
// sees EOF or a reset) and returns the GOAWAY it sent, if any.
func (h *h2) waitClosed(timeout time.Duration) *h2goaway {
	h.tb.Helper()
	select {
	case <-h.done:
	case <-time.After(timeout):
		h.tb.Fatalf("the server kept the connection open for %s", timeout)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.goaway
}

// alive reports whether the connection still answers a PING.
func (h *h2) alive(timeout time.Duration) bool {
	h.mu.Lock()
	before := h.pingAcks
	h.mu.Unlock()
	h.ping()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		h.mu.Lock()
		acks, closed := h.pingAcks, h.closed
		h.mu.Unlock()
		if acks > before {
			return true
		}
		if closed != nil {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// counts tallies the ended streams by outcome: "grpc-status N", "RST
// <code>" or "open".
func (h *h2) counts(ids []uint32) map[string]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]int{}
	for _, id := range ids {
		s, ok := h.streams[id]
		switch {
		case !ok || !s.ended:
			out["open"]++
		case s.rst:
			out["RST "+s.rstCode.String()]++
		default:
			out["grpc-status "+strconv.Itoa(s.grpcStatus)]++
		}
	}
	return out
}
