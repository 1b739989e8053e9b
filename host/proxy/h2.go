package proxy

import (
	"bytes"
	"cmp"
	"errors"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// HTTP/2 parameters of the relay (RFC 9113). The proxy advertises the same
// windows to clients and to the enclave.
const (
	// streamWindow is the receive window of each stream, both ways: what a
	// peer may send on a stream before the proxy has passed it on. It
	// bounds what the proxy buffers for one stream whose other end is slow.
	streamWindow = 256 << 10
	// connWindow is the receive window of each connection. The proxy
	// returns connection credit as soon as it has read the data (it is then
	// buffered against the stream's window), so one stalled stream never
	// holds up the others on its connection.
	connWindow = 4 << 20
	// maxFrameSize is the largest frame the proxy reads (the HTTP/2 default,
	// which grpc-go also uses).
	maxFrameSize = 16 << 10
	// maxWriteBuffer bounds the bytes queued for one client connection
	// whose peer does not read; beyond it the connection is closed. It is
	// a last resort: the client's reader pauses far below it (see
	// Config.MaxConnectionBuffer) and response DATA waits above
	// clientSendCap, so only a broken invariant reaches it. Upstream
	// connections have no such limit: they are never closed because of
	// what clients queued on them (laneBusy applies backpressure instead).
	maxWriteBuffer = 16 << 20
	// clientSendCap: response DATA is not written into a client
	// connection's buffer beyond this many bytes; it stays queued on its
	// stream (bounded by the stream's window) until the client reads.
	clientSendCap = 256 << 10
	// laneBusy: an upstream connection with more than this many bytes
	// waiting to be written to the enclave takes no new calls, and the
	// client readers relaying requests into it wait (backpressure).
	laneBusy = 1 << 20
	// minBatch: a flusher with less than this to write yields once first.
	minBatch = 4 << 10
	// queueChunk is the size up to which queued DATA is gathered in one
	// buffer.
	queueChunk = 64 << 10
	// maxStreamID is the largest stream id (2^31-1).
	maxStreamID = 1<<31 - 1
)

// errWriteBufferFull closes a connection whose peer stopped reading.
var errWriteBufferFull = errors.New("peer is not reading: write buffer full")

// errNoRoom: what waited for a connection's buffer to drain gave up.
var errNoRoom = errors.New("peer is not reading: buffered frames did not drain")

// account counts the bytes the proxy holds in memory on behalf of one
// owner (a client connection, an upstream connection) and, through
// parent, for the whole proxy (Config.MemoryBudget). A reader paused
// until its account drains waits on drained.
type account struct {
	n      atomic.Int64
	parent *account

	waiting atomic.Bool // someone waits on wake: signal at the next decrease
	mu      sync.Mutex
	wake    chan struct{}
}

func (a *account) add(d int64) {
	if a == nil || d == 0 {
		return
	}
	a.n.Add(d)
	if d < 0 && a.waiting.Load() {
		a.signal()
	}
	if a.parent != nil {
		a.parent.add(d)
	}
}

func (a *account) load() int64 {
	if a == nil {
		return 0
	}
	return a.n.Load()
}

// drained returns a channel closed at the next decrease of the account.
// A waiter takes it, checks its condition again, then waits on it.
func (a *account) drained() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.wake == nil {
		a.wake = make(chan struct{})
	}
	a.waiting.Store(true)
	return a.wake
}

func (a *account) signal() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.waiting.Store(false)
	if a.wake != nil {
		close(a.wake)
		a.wake = nil
	}
}

// endpoint is the sending half of one HTTP/2 connection, client or
// upstream. Frames are encoded, under mu, into an in-memory buffer; one
// flusher goroutine writes that buffer to the socket. So a goroutine that
// relays a frame never blocks on a slow peer's socket, and frames written
// while the flusher is busy go out together in one write.
//
// mu also guards the connection's send-side flow control: its window, the
// peer's settings and the streams waiting for window.
type endpoint struct {
	nc net.Conn
	// closer is what fail closes: nc, or the TCP connection under a TLS
	// nc (a TLS close would first try to send close_notify to a peer that
	// may not be reading, and this close runs under mu).
	closer net.Conn

	mu       sync.Mutex
	buf      *bytes.Buffer // frames not yet taken by the flusher
	spare    *bytes.Buffer
	fr       *http2.Framer // writes into buf
	hbuf     []byte        // the header block being written
	hstarted bool          // a header block was written (hpackStart)
	err      error         // set once: the connection is closed
	window   int64         // connection-level send window
	initWin  int64         // peer's SETTINGS_INITIAL_WINDOW_SIZE
	maxFrame uint32
	blocked  []*half // streams with queued data waiting for window
	writing  bool    // the flusher is writing (outside mu)
	inWrite  int     // bytes the flusher is writing
	wrote    bool    // relayed HEADERS or DATA written since the last look (ping policy)

	// limit: more than this many bytes queued closes the connection (0:
	// never). sendCap: DATA waits on its stream while more than this many
	// bytes are queued (0: no cap); the flusher resumes it as it drains.
	limit   int
	sendCap int
	// acct is charged with the bytes queued here; held is what it was
	// last charged.
	acct *account
	held int64
	// room is closed (and replaced) when the flusher has written and
	// someone asked (roomWanted): waitRoom's wake-up.
	room       chan struct{}
	roomWanted bool
	// sw writes without blocking (flushNow), so a reader can send what
	// it queued itself instead of waking the flusher; nil for TLS and
	// in-memory connections, which only the flusher writes.
	sw *sockWriter
	// cork > 0: a reader is queuing frames here that arrived together;
	// flushLocked then only notes kickDue, and the reader flushes once its
	// input runs out (flushBatch), so they leave in one write.
	cork    int
	kickDue bool
	// lazy is how many bytes at the head of buf are acknowledgements
	// that may wait for the next write (PING ACK, WINDOW_UPDATE): when
	// nothing else is queued and a response is due, flushBatch leaves
	// them to ride along with it (deferLazy), at most lazyDelay later.
	lazy      int
	lazySince time.Time // when the queued acknowledgements were deferred (zero: none are)
	lazyTimer *time.Timer
	lazyArmed bool // lazyTimer is running

	kick chan struct{} // wakes the flusher
	done chan struct{} // closed when the flusher has exited
}

// bufWriter lets the framer write into whatever buffer is current.
type bufWriter struct{ e *endpoint }

func (w bufWriter) Write(p []byte) (int, error) { return w.e.buf.Write(p) }

func newEndpoint(nc net.Conn, acct *account) *endpoint {
	e := &endpoint{
		nc:       nc,
		closer:   nc,
		buf:      new(bytes.Buffer),
		spare:    new(bytes.Buffer),
		window:   65535,
		initWin:  65535,
		maxFrame: 16384,
		acct:     acct,
		room:     make(chan struct{}),
		kick:     make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	if rc := rawConnOf(nc); rc != nil {
		e.sw = newSockWriter(nc, rc)
	}
	e.fr = http2.NewFramer(bufWriter{e}, nil)
	return e
}

// run is the flusher: it writes what the buffer holds whenever kicked,
// until the endpoint fails. onErr is told why the connection failed.
func (e *endpoint) run(onErr func(error)) {
	defer close(e.done)
	for range e.kick {
		e.mu.Lock()
		if e.err != nil {
			e.mu.Unlock()
			return
		}
		if e.buf.Len() < minBatch {
			// Let the goroutines relaying other streams add their frames
			// first: one write for many calls costs the peer, too, one
			// wake-up instead of many (grpc-go's writer does the same).
			e.mu.Unlock()
			runtime.Gosched()
			e.mu.Lock()
			if e.err != nil {
				e.mu.Unlock()
				return
			}
		}
		b := e.buf
		if b.Len() == 0 {
			e.mu.Unlock()
			continue
		}
		e.buf, e.spare = e.spare, b
		e.lazySentLocked()
		e.writing = true
		e.inWrite = b.Len()
		e.mu.Unlock()
		_, err := e.nc.Write(b.Bytes())
		if b.Cap() > 1<<20 {
			b = new(bytes.Buffer) // do not keep a burst's buffer
		}
		b.Reset()
		e.mu.Lock()
		e.spare = b
		e.writing = false
		e.inWrite = 0
		var list []sent
		if err == nil {
			list = e.wroteLocked()
		}
		e.mu.Unlock()
		report(list)
		if err != nil {
			onErr(err)
			e.fail(err)
			return
		}
	}
}

// wroteLocked is the bookkeeping after bytes left: the account, whoever
// waits for room, and DATA held back by sendCap (reported by the caller,
// outside mu).
func (e *endpoint) wroteLocked() []sent {
	e.recountLocked()
	e.wakeRoomLocked()
	if e.sendCap > 0 && len(e.blocked) > 0 {
		return e.resumeBlockedLocked()
	}
	return nil
}

// kickLocked wakes the flusher.
func (e *endpoint) kickLocked() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// flushNow sends what is queued: written at once, without blocking, when
// the connection allows it and nothing is being written; what the socket
// does not take, and everything on other connections, is left to the
// flusher.
func (e *endpoint) flushNow() {
	e.mu.Lock()
	if e.err != nil || e.buf.Len() == 0 {
		e.mu.Unlock()
		return
	}
	if e.sw == nil || e.writing {
		e.kickLocked()
		e.mu.Unlock()
		return
	}
	n, err := e.sw.writeNow(e.buf.Bytes())
	if err != nil {
		e.failLocked(err)
		e.mu.Unlock()
		return
	}
	e.buf.Next(n)
	e.lazySentLocked() // sent, or left to the flusher
	if e.buf.Len() > 0 {
		e.kickLocked()
	}
	list := e.wroteLocked()
	e.mu.Unlock()
	report(list)
}

// corked runs fn, which queues frames on e, with e corked: the flush is
// left to b (the caller's reader, when its input runs out), or done at
// once when b is nil. fn must not block.
func (e *endpoint) corked(b *flushBatch, fn func()) {
	e.mu.Lock()
	e.cork++
	e.mu.Unlock()
	fn()
	e.mu.Lock()
	e.cork--
	due := e.cork == 0 && e.kickDue
	if due {
		e.kickDue = false
	}
	e.mu.Unlock()
	if due {
		if b != nil {
			b.add(e)
		} else {
			e.flushNow()
		}
	}
}

// flushBatch holds the endpoints one reader goroutine queued frames on
// while it still had input buffered; it flushes them when that input runs
// out, so frames that arrived together leave together, in one write and
// without waking a flusher (a syscall and a wake-up per frame are most of
// what a relayed call costs at low load).
//
// own is the reader's own connection: what goes back on it (PING and
// SETTINGS acknowledgements, window updates) is written after what it
// relays to the others, which is what a caller waits for.
type flushBatch struct {
	own    *endpoint
	ownDue bool
	eps    []*endpoint
	// due, when set, reports whether own expects a relayed write soon (a
	// client connection with calls open upstream): its acknowledgements
	// may then wait for it (endpoint.deferLazy).
	due func() bool
}

func (b *flushBatch) add(e *endpoint) {
	if e == b.own {
		b.ownDue = true
		return
	}
	for _, x := range b.eps {
		if x == e {
			return
		}
	}
	b.eps = append(b.eps, e)
}

func (b *flushBatch) flush() {
	for i, e := range b.eps {
		e.flushNow()
		b.eps[i] = nil
	}
	b.eps = b.eps[:0]
	if b.ownDue {
		b.ownDue = false
		if b.due != nil && b.due() && b.own.deferLazy() {
			return
		}
		b.own.flushNow()
	}
}

// rawConnOf is nc's raw connection for reads and writes that never
// block (sockio.go), or nil when it has none (TLS, in-memory).
func rawConnOf(nc net.Conn) syscall.RawConn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// queuedLocked is the number of bytes waiting to reach the peer.
func (e *endpoint) queuedLocked() int { return e.buf.Len() + e.inWrite }

// recountLocked charges the account with what is queued now.
func (e *endpoint) recountLocked() {
	now := int64(e.queuedLocked())
	if e.err != nil {
		now = 0
	}
	e.acct.add(now - e.held)
	e.held = now
}

// wakeRoomLocked wakes whoever waits in waitRoom.
func (e *endpoint) wakeRoomLocked() {
	if e.roomWanted {
		close(e.room)
		e.room = make(chan struct{})
		e.roomWanted = false
	}
}

// sendRoomLocked is how many DATA bytes may still be queued (sendCap).
func (e *endpoint) sendRoomLocked() int64 {
	if e.sendCap <= 0 {
		return 1 << 62
	}
	return int64(e.sendCap - e.queuedLocked())
}

// waitRoom waits until at most max bytes are queued for the peer. It
// returns errNoRoom after timeout, or the connection's error.
func (e *endpoint) waitRoom(max int, timeout time.Duration) error {
	var t *time.Timer
	for {
		e.mu.Lock()
		if e.err != nil {
			err := e.err
			e.mu.Unlock()
			return err
		}
		if e.queuedLocked() <= max {
			e.mu.Unlock()
			return nil
		}
		e.roomWanted = true
		ch := e.room
		e.mu.Unlock()
		if t == nil {
			t = time.NewTimer(timeout)
			defer t.Stop()
		}
		select {
		case <-ch:
		case <-t.C:
			return errNoRoom
		}
	}
}

// status is what is queued and whether the connection failed.
func (e *endpoint) status() (queued int, failed bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.queuedLocked(), e.err != nil
}

// queued is queuedLocked for callers without mu.
func (e *endpoint) queued() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.queuedLocked()
}

// flushLocked wakes the flusher; it fails the endpoint when the peer has
// let too much pile up.
func (e *endpoint) flushLocked() {
	if e.err != nil {
		return
	}
	if e.limit > 0 && e.buf.Len() > e.limit {
		e.failLocked(errWriteBufferFull)
		return
	}
	e.recountLocked()
	if e.cork > 0 {
		e.kickDue = true
		return
	}
	e.kickLocked()
}

// fail closes the connection (idempotent) and stops the flusher.
func (e *endpoint) fail(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.failLocked(err)
}

func (e *endpoint) failLocked(err error) {
	if e.err != nil {
		return
	}
	e.err = err
	_ = e.closer.Close()
	close(e.kick)
	if e.lazyTimer != nil {
		e.lazyTimer.Stop()
	}
	e.recountLocked()
	e.wakeRoomLocked()
	// What waits for window will never be sent: give its bytes back.
	for _, h := range e.blocked {
		h.blocked = false
		h.dropQueue()
	}
	e.blocked = nil
}

// drainAndClose lets the flusher write what is buffered (a GOAWAY), then
// closes, waiting at most d.
func (e *endpoint) drainAndClose(err error, d time.Duration) {
	e.mu.Lock()
	if e.err == nil {
		e.flushLocked()
		e.kickLocked() // even when corked: the connection ends here
	}
	e.mu.Unlock()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		e.mu.Lock()
		empty := (e.buf.Len() == 0 && !e.writing) || e.err != nil
		e.mu.Unlock()
		if empty {
			break
		}
		time.Sleep(time.Millisecond)
	}
	_ = e.nc.SetWriteDeadline(time.Now().Add(d))
	e.fail(err)
}

// writeHeadersLocked encodes fields (hpackenc.go) and writes them as
// HEADERS (+ CONTINUATION) on stream id.
func (e *endpoint) writeHeadersLocked(id uint32, fields []hpack.HeaderField, end bool) {
	if e.err != nil {
		return
	}
	e.hbuf = e.hbuf[:0]
	if !e.hstarted {
		e.hstarted = true
		e.hbuf = append(e.hbuf, hpackStart)
	}
	e.hbuf = appendHeaderBlock(e.hbuf, fields)
	block := e.hbuf
	max := int(e.maxFrame)
	first := block
	if len(first) > max {
		first = first[:max]
	}
	block = block[len(first):]
	_ = e.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: end, EndHeaders: len(block) == 0})
	for len(block) > 0 {
		n := min(len(block), max)
		_ = e.fr.WriteContinuation(id, n == len(block), block[:n])
		block = block[n:]
	}
	e.flushLocked()
}

// writeRSTLocked resets stream id.
func (e *endpoint) writeRSTLocked(id uint32, code http2.ErrCode) {
	if e.err != nil {
		return
	}
	_ = e.fr.WriteRSTStream(id, code)
	e.flushLocked()
}

// windowUpdate returns n bytes of receive credit on stream id (0: the
// connection).
func (e *endpoint) windowUpdate(id uint32, n uint32) {
	if n == 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.err != nil {
		return
	}
	e.markLazyLocked(func() { _ = e.fr.WriteWindowUpdate(id, n) })
	e.flushLocked()
}

// ping writes a PING (ack: the answer to one with data).
func (e *endpoint) ping(ack bool, data [8]byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.err == nil {
		if ack {
			e.markLazyLocked(func() { _ = e.fr.WritePing(ack, data) })
		} else {
			_ = e.fr.WritePing(ack, data)
		}
		e.flushLocked()
	}
}

// lazyDelay bounds how long deferLazy lets acknowledgements wait.
const lazyDelay = 5 * time.Millisecond

// markLazyLocked runs write, which queues one acknowledgement, and counts
// it as lazy when only lazy frames were queued before it.
func (e *endpoint) markLazyLocked(write func()) {
	before := e.buf.Len()
	write()
	if before == e.lazy {
		e.lazy = e.buf.Len()
	}
}

// deferLazy reports whether everything queued is lazy acknowledgements,
// and if so leaves them for the next write, or for lazyDelay at most: a
// PING ACK that waits for the response the peer's request will get saves
// a write and the peer a read, per call.
func (e *endpoint) deferLazy() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.err != nil || e.writing || e.buf.Len() == 0 || e.buf.Len() != e.lazy {
		return false
	}
	// The wait is counted from the first deferral of what is queued, so
	// none waits more than lazyDelay however often it is deferred again.
	if e.lazySince.IsZero() {
		e.lazySince = time.Now()
	}
	if !e.lazyArmed {
		e.lazyArmed = true
		if e.lazyTimer == nil {
			e.lazyTimer = time.AfterFunc(lazyDelay, e.lazyFlush)
		} else {
			e.lazyTimer.Reset(lazyDelay)
		}
	}
	return true
}

// lazySentLocked notes that the queued acknowledgements left with other
// frames (or went to the flusher). Their timer is left running: arming a
// timer can wake another thread, and a connection with a call every few
// hundred microseconds would pay that on every call. When it fires, it
// flushes only acknowledgements that have waited lazyDelay, and waits on
// for younger ones, so none leaves early and alone.
func (e *endpoint) lazySentLocked() {
	e.lazy = 0
	e.lazySince = time.Time{}
}

// lazyFlush is the deferred acknowledgements' timer.
func (e *endpoint) lazyFlush() {
	e.mu.Lock()
	if e.lazySince.IsZero() || e.err != nil {
		e.lazyArmed = false // nothing waits: the timer lapses
		e.mu.Unlock()
		return
	}
	if wait := lazyDelay - time.Since(e.lazySince); wait > 0 {
		e.lazyTimer.Reset(wait)
		e.mu.Unlock()
		return
	}
	e.lazyArmed = false
	e.mu.Unlock()
	e.flushNow()
}

// addWindow applies a WINDOW_UPDATE (h nil: the connection), resumes the
// streams it unblocks and tells their senders. A http2.StreamError is
// one stream's window overflowing; any other error, the connection's.
func (e *endpoint) addWindow(h *half, incr uint32) error {
	e.mu.Lock()
	list, err := e.addWindowLocked(h, incr)
	e.mu.Unlock()
	report(list)
	return err
}

// settings applies the peer's SETTINGS (streams visits every half
// sending to it, for a change of the initial window), acknowledges them
// and resumes what a larger window unblocks.
func (e *endpoint) settings(f *http2.SettingsFrame, streams func(func(*half))) error {
	e.mu.Lock()
	if err := e.applySettingsLocked(f, streams); err != nil {
		e.mu.Unlock()
		return err
	}
	var list []sent
	if e.err == nil {
		_ = e.fr.WriteSettingsAck()
		list = e.resumeBlockedLocked()
		e.flushLocked()
	}
	e.mu.Unlock()
	report(list)
	return nil
}

// half is one direction of a relayed call, as the endpoint it is sent to
// sees it: a stream id there, its send window, and what waits for window.
// Every field is guarded by dst.mu.
type half struct {
	dst    *endpoint
	id     uint32
	window int64
	// queued DATA, in order, then the end: END_STREAM alone or trailers.
	q        [][]byte
	qEnd     bool
	trailers []hpack.HeaderField
	qBytes   int64 // bytes in q, charged to acct
	acct     *account
	blocked  bool // in dst.blocked
	closed   bool // END_STREAM or RST_STREAM written: no more DATA goes out
	over     bool // the stream is over on dst (reset, or ended both ways): no frame at all
	// onSent is told, outside dst.mu, how many DATA bytes went out, which
	// is the credit the proxy then returns to the sender on the other
	// side; and whether the end went out too.
	onSent func(n int, ended bool)
}

// sendLocked sends data (then END_STREAM when end) on h as far as the
// windows allow and queues the rest. It returns the bytes sent and
// whether the end went out. data is copied when queued.
func (h *half) sendLocked(data []byte, end bool, trailers []hpack.HeaderField) (int, bool) {
	e := h.dst
	if h.closed || e.err != nil {
		return len(data), false // dropped; the call is over on this side
	}
	if len(h.q) > 0 || h.qEnd {
		if len(data) > 0 {
			h.enqueue(data)
		}
		h.qEnd = h.qEnd || end
		if trailers != nil {
			h.trailers = slices.Clone(trailers) // the reader reuses its fields
		}
		return 0, false
	}
	sent := 0
	e.wrote = true
	for len(data) > 0 {
		n := int(min(int64(len(data)), h.window, e.window, int64(e.maxFrame), e.sendRoomLocked()))
		if n <= 0 {
			break
		}
		last := n == len(data) && end && trailers == nil
		_ = e.fr.WriteData(h.id, last, data[:n])
		h.window -= int64(n)
		e.window -= int64(n)
		sent += n
		data = data[n:]
	}
	if len(data) > 0 {
		h.enqueue(data)
		h.qEnd = end
		h.trailers = slices.Clone(trailers) // the reader reuses its fields
		h.block()
		e.flushLocked()
		return sent, false
	}
	ended := false
	switch {
	case trailers != nil:
		e.writeHeadersLocked(h.id, trailers, true)
		h.closed, ended = true, true
	case end:
		if sent == 0 {
			_ = e.fr.WriteData(h.id, true, nil)
		}
		h.closed, ended = true, true
	}
	e.flushLocked()
	return sent, ended
}

// enqueue copies data to the end of h's queue, into the last chunk while
// it is small, so that many tiny frames do not cost a slice header and an
// allocation each: what is queued stays close to the stream's window.
func (h *half) enqueue(data []byte) {
	h.qBytes += int64(len(data))
	h.acct.add(int64(len(data)))
	if n := len(h.q); n > 0 && len(h.q[n-1])+len(data) <= queueChunk {
		h.q[n-1] = append(h.q[n-1], data...)
		return
	}
	c := make([]byte, len(data), max(len(data), min(queueChunk, 4*len(data))))
	copy(c, data)
	h.q = append(h.q, c)
}

// dropQueue forgets what h has queued (the stream is over).
func (h *half) dropQueue() {
	h.acct.add(-h.qBytes)
	h.q, h.qBytes, h.qEnd, h.trailers = nil, 0, false, nil
}

// block puts h on its endpoint's list of streams waiting for window.
func (h *half) block() {
	if !h.blocked {
		h.blocked = true
		h.dst.blocked = append(h.dst.blocked, h)
	}
}

// resumeLocked sends what h has queued as far as the windows now allow.
func (h *half) resumeLocked() (int, bool) {
	if h.closed {
		h.dropQueue()
		return 0, false
	}
	e := h.dst
	sent := 0
	defer func() {
		h.qBytes -= int64(sent)
		h.acct.add(-int64(sent))
	}()
	for len(h.q) > 0 {
		d := h.q[0]
		n := int(min(int64(len(d)), h.window, e.window, int64(e.maxFrame), e.sendRoomLocked()))
		if n <= 0 {
			h.block()
			e.flushLocked()
			return sent, false
		}
		last := n == len(d) && len(h.q) == 1 && h.qEnd && h.trailers == nil
		_ = e.fr.WriteData(h.id, last, d[:n])
		e.wrote = true
		h.window -= int64(n)
		e.window -= int64(n)
		sent += n
		if n == len(d) {
			h.q[0] = nil
			h.q = h.q[1:]
		} else {
			h.q[0] = d[n:]
		}
		if last {
			h.closed = true
			h.qEnd = false
			e.flushLocked()
			return sent, true
		}
	}
	ended := false
	if h.trailers != nil {
		e.writeHeadersLocked(h.id, h.trailers, true)
		h.trailers, h.closed, ended = nil, true, true
	} else if h.qEnd {
		_ = e.fr.WriteData(h.id, true, nil)
		h.qEnd, h.closed, ended = false, true, true
	}
	e.flushLocked()
	return sent, ended
}

// resetLocked ends h with RST_STREAM(code) unless the stream is over.
func (h *half) resetLocked(code http2.ErrCode) {
	if h.over {
		return
	}
	h.closed, h.over = true, true
	h.dropQueue()
	h.dst.writeRSTLocked(h.id, code)
}

// sent is what resuming one half produced, reported outside the lock.
type sent struct {
	h     *half
	n     int
	ended bool
}

// addWindowLocked applies a WINDOW_UPDATE (h nil: the connection) and
// resumes the streams it unblocks.
func (e *endpoint) addWindowLocked(h *half, incr uint32) ([]sent, error) {
	if h != nil {
		h.window += int64(incr)
		if h.window > maxStreamID {
			return nil, http2.StreamError{StreamID: h.id, Code: http2.ErrCodeFlowControl}
		}
		if !h.blocked {
			return nil, nil
		}
	} else {
		e.window += int64(incr)
		if e.window > maxStreamID {
			return nil, http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	}
	return e.resumeBlockedLocked(), nil
}

// resumeBlockedLocked retries every blocked stream, those with the least
// queued first: a connection's window is shared by every client whose
// calls it carries, and a small request must not wait behind megabytes
// that other clients queued before it (64 KiB requests from a few
// clients kept a well-behaved client's 32-byte calls waiting for seconds).
// What is nearly sent goes first, too, which frees the enclave's handlers
// soonest.
func (e *endpoint) resumeBlockedLocked() []sent {
	if len(e.blocked) == 0 {
		return nil
	}
	var out []sent
	list := e.blocked
	e.blocked = nil
	for _, h := range list {
		h.blocked = false
	}
	slices.SortStableFunc(list, func(a, b *half) int { return cmp.Compare(a.qBytes, b.qBytes) })
	for _, h := range list {
		if n, ended := h.resumeLocked(); n > 0 || ended {
			out = append(out, sent{h, n, ended})
		}
	}
	return out
}

// applySettingsLocked applies the peer's SETTINGS; streams holds every
// open half sending to this peer (for a change of the initial window).
func (e *endpoint) applySettingsLocked(f *http2.SettingsFrame, streams func(func(*half))) error {
	return f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - e.initWin
			e.initWin = int64(s.Val)
			if delta != 0 && streams != nil {
				streams(func(h *half) { h.window += delta })
			}
		case http2.SettingMaxFrameSize:
			e.maxFrame = s.Val
		}
		// SETTINGS_HEADER_TABLE_SIZE: the proxy's header blocks use no
		// dynamic table (hpackenc.go), so any size will do.
		return nil
	})
}

// report tells each half's sender what went out.
func report(list []sent) {
	for _, s := range list {
		if s.h.onSent != nil {
			s.h.onSent(s.n, s.ended)
		}
	}
}
