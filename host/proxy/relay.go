package proxy

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"

	"github.com/nitrosign/nitrosign/host/metrics"
)

// The relay: the proxy does not terminate gRPC. Each client connection is
// an HTTP/2 server connection whose streams are relayed, frame by frame, to
// streams on pooled upstream connections (lanes): headers are decoded and
// re-encoded (HPACK state is per connection), DATA is copied as it is,
// flow control is kept on both sides. gRPC itself is read only where the
// proxy must act: the method (routing, limits, metrics), grpc-timeout,
// x-request-id, grpc-status, and the 5-byte message prefix of requests
// (the size limit).

// srvConn is one client connection.
type srvConn struct {
	px   *Proxy
	nc   net.Conn
	ep   *endpoint
	peer string

	fr *frameReader // reads; owned by serve

	// Read side, owned by serve.
	lastID      atomic.Uint32 // highest stream id the client opened; written by serve under mu
	in          *inflow       // the connection's receive window
	pingStrikes int
	lastPing    time.Time
	resets      tokenBucket // streams the client may reset (Config.MaxClientResets)
	strikes     tokenBucket // what no well-behaved client sends often (maxStrikes)
	// frameBytes is what the current ReadFrame may read (a header block
	// and its CONTINUATIONs included): a CONTINUATION flood ends there.
	frameBytes frameBudget

	// acct holds what this connection makes the proxy queue that drains
	// without reading more from it: frames for the client, and request
	// bytes waiting for the enclave's window. Above
	// Config.MaxConnectionBuffer its reader pauses.
	acct account
	// held counts the response bytes waiting in the proxy for this
	// client to read them (its streams' windows, or its socket): over
	// maxHeldResponses it gets no new call until it reads.
	held account
	// upCalls is the number of this connection's calls open upstream
	// (Config.MaxConnectionCalls).
	upCalls atomic.Int32
	// deadlines expires its calls' deadlines, with one timer.
	deadlines deadlines
	// batch holds the connections the reader queued frames on; owned by
	// serve.
	batch flushBatch

	mu       sync.Mutex
	calls    map[uint32]*call
	goAway   bool      // GOAWAY sent: no new streams
	lastCall time.Time // when the last call ended (idle timeout)

	lastRead  atomic.Int64 // unix nanos of the last frame read (keepalive)
	pingAcked atomic.Bool
	done      chan struct{} // closed when serve returns
}

// serveConn runs one client connection until it ends.
func (p *Proxy) serveConn(nc net.Conn) {
	defer func() {
		if v := recover(); v != nil {
			p.log.Error("panic serving a client connection: connection closed", zap.Any("panic", v), zap.Stack("stack"))
			_ = nc.Close()
		}
	}()
	// Until the handshake is done, the connection is bounded by the
	// handshake timeout and closed by Stop.
	_ = nc.SetDeadline(time.Now().Add(p.cfg.Limits.HandshakeTimeout))
	handshaking := make(chan struct{})
	go func() {
		select {
		case <-p.stopping:
			_ = nc.Close()
		case <-handshaking:
		}
	}()
	raw := nc // closing it never blocks, unlike a TLS close_notify
	if p.tls != nil {
		tc := tls.Server(nc, p.tlsConf)
		if err := tc.Handshake(); err != nil {
			close(handshaking)
			p.tlsRefused(nc.RemoteAddr(), err)
			_ = nc.Close()
			return
		}
		nc = tc
	}
	sc := &srvConn{
		px:    p,
		nc:    nc,
		peer:  nc.RemoteAddr().String(),
		calls: map[uint32]*call{},
		in:    newInflow(connWindow),
		done:  make(chan struct{}),
	}
	sc.acct.parent = &p.mem
	sc.held.parent = &p.mem
	ep := newEndpoint(nc, &sc.acct)
	ep.closer = raw
	ep.limit = maxWriteBuffer
	ep.sendCap = clientSendCap
	sc.ep = ep
	sc.batch.own = ep
	// With calls open upstream, a response is on its way: the PING ACKs
	// and window updates the reader owes the client ride along with it.
	sc.batch.due = func() bool { return sc.upCalls.Load() > 0 }
	if !p.track(sc, true) {
		close(handshaking)
		_ = nc.Close()
		return
	}
	defer p.track(sc, false)
	sc.serve(handshaking)
}

// handshake reads the client preface and first SETTINGS and sends the
// proxy's settings.
func (sc *srvConn) handshake(br *bufio.Reader) error {
	// The server's SETTINGS go first, without waiting for the client's
	// (RFC 9113 section 3.4), as grpc-go servers do.
	ep := sc.ep
	ep.mu.Lock()
	_ = ep.fr.WriteSettings(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: sc.px.cfg.Limits.MaxConcurrentStreams},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: sc.px.cfg.Limits.MaxHeaderListSize},
	)
	_ = ep.fr.WriteWindowUpdate(0, connWindow-65535)
	ep.flushLocked()
	ep.mu.Unlock()
	var pre [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(br, pre[:]); err != nil {
		return fmt.Errorf("reading the HTTP/2 preface: %w", err)
	}
	if string(pre[:]) != http2.ClientPreface {
		return errors.New("not an HTTP/2 client preface (is the client speaking gRPC over plaintext HTTP/2?)")
	}
	f, err := sc.fr.ReadFrame()
	if err != nil {
		return fmt.Errorf("reading the client's SETTINGS: %w", err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return fmt.Errorf("first frame is %s, not SETTINGS", f.Header().Type)
	}
	ep.mu.Lock()
	defer ep.mu.Unlock()
	if err := ep.applySettingsLocked(sf, nil); err != nil {
		return err
	}
	_ = ep.fr.WriteSettingsAck()
	ep.flushLocked()
	return nil
}

func (sc *srvConn) serve(handshaking chan struct{}) {
	px := sc.px
	defer close(sc.done)
	br := bufio.NewReaderSize(newSockReader(sc.nc, &sc.lastRead), 32<<10)
	sc.frameBytes.r = br
	sc.frameBytes.left = maxFrameRead(px.cfg.Limits.MaxHeaderListSize)
	sc.fr = newFrameReader(&sc.frameBytes, px.cfg.Limits.MaxHeaderListSize)
	go sc.ep.run(func(err error) {})
	err := sc.handshake(br)
	close(handshaking)
	if err != nil {
		px.log.Debug("client connection failed its HTTP/2 handshake", zap.String("peer", sc.peer), zap.Error(err))
		sc.ep.drainAndClose(err, time.Second)
		<-sc.ep.done
		return
	}
	_ = sc.nc.SetDeadline(time.Time{})
	sc.lastRead.Store(time.Now().UnixNano())
	sc.mu.Lock()
	sc.lastCall = time.Now()
	sc.mu.Unlock()
	keeperDone := make(chan struct{})
	go sc.keeper(keeperDone)

	readErr := false
	for err == nil {
		if br.Buffered() == 0 {
			sc.batch.flush() // nothing more to read without waiting
		}
		if sc.acct.load() > int64(px.cfg.MaxConnectionBuffer)/8 {
			sc.batch.flush()
			if err = sc.waitRoom(); err != nil {
				break
			}
		}
		var f http2.Frame
		sc.frameBytes.left = maxFrameRead(px.cfg.Limits.MaxHeaderListSize)
		f, err = sc.fr.ReadFrame()
		if errors.Is(err, errFrameTooLong) {
			px.log.Info("client sends a header block in endless CONTINUATION frames: GOAWAY ENHANCE_YOUR_CALM", zap.String("peer", sc.peer))
			err = &goAwayError{http2.ErrCodeEnhanceYourCalm, "header block too long"}
			break
		}
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				// A malformed stream (an invalid header field): reset it,
				// keep the connection.
				sc.mu.Lock()
				if se.StreamID > sc.lastID.Load() {
					sc.lastID.Store(se.StreamID)
				}
				sc.mu.Unlock()
				if c := sc.call(se.StreamID); c != nil {
					c.clientReset(se.Code)
				}
				sc.resetStream(se.StreamID, se.Code)
				err = sc.strike("too_many_malformed_requests")
				continue
			}
			readErr = true
			break
		}
		switch f.(type) {
		case *http2.SettingsFrame, *http2.PingFrame, *http2.WindowUpdateFrame:
			// Answers that never block: sent with what else is due.
			sc.ep.corked(&sc.batch, func() { err = sc.handle(f) })
		default:
			err = sc.handle(f)
		}
	}
	sc.batch.flush()
	close(keeperDone)

	var ce http2.ConnectionError
	var ge *goAwayError
	switch {
	case errors.As(err, &ge):
		sc.goAwayAndClose(ge.code, ge.debug)
	case readErr && errors.As(err, &ce):
		// A frame that cannot be read (bad framing, a header block over
		// the limit by more than a frame): GOAWAY PROTOCOL_ERROR, as
		// grpc-go servers answer.
		sc.goAwayAndClose(http2.ErrCodeProtocol, "")
	case errors.As(err, &ce):
		sc.goAwayAndClose(http2.ErrCode(ce), "")
	case errors.Is(err, errGoAwaySent):
	default:
		if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
			px.log.Debug("client connection ended", zap.String("peer", sc.peer), zap.Error(err))
		}
		sc.ep.fail(err)
	}
	<-sc.ep.done
	sc.ep.fail(net.ErrClosed)
	// Every call still open loses its client.
	sc.mu.Lock()
	calls := make([]*call, 0, len(sc.calls))
	for _, c := range sc.calls {
		calls = append(calls, c)
	}
	sc.mu.Unlock()
	for _, c := range calls {
		c.clientGone()
	}
	sc.deadlines.stop()
}

var errGoAwaySent = errors.New("GOAWAY sent")

// goAwayError ends a client connection with GOAWAY(code) and a debug
// message saying why.
type goAwayError struct {
	code  http2.ErrCode
	debug string
}

func (e *goAwayError) Error() string { return fmt.Sprintf("GOAWAY %s: %s", e.code, e.debug) }

// goAwayAndClose ends the connection with GOAWAY(code).
func (sc *srvConn) goAwayAndClose(code http2.ErrCode, debug string) {
	sc.ep.mu.Lock()
	if sc.ep.err == nil {
		_ = sc.ep.fr.WriteGoAway(sc.lastID.Load(), code, []byte(debug))
	}
	sc.ep.mu.Unlock()
	sc.ep.drainAndClose(fmt.Errorf("GOAWAY %s", code), time.Second)
}

// handle processes one frame from the client. A returned
// http2.ConnectionError ends the connection with GOAWAY.
func (sc *srvConn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return sc.onHeaders(f)
	case *http2.DataFrame:
		return sc.onData(f)
	case *http2.WindowUpdateFrame:
		return sc.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		if c := sc.call(f.StreamID); c != nil {
			c.clientReset(f.ErrCode)
			if !sc.resets.take(float64(sc.px.cfg.MaxClientResets)) {
				sc.px.log.Info("client resets too many streams: GOAWAY ENHANCE_YOUR_CALM",
					zap.String("peer", sc.peer), zap.Int("budget", sc.px.cfg.MaxClientResets))
				sc.px.shed(metrics.ShedTooManyResets)
				return &goAwayError{http2.ErrCodeEnhanceYourCalm, "too_many_resets"}
			}
		} else if f.StreamID > sc.lastID.Load() {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if err := sc.strike("too_many_settings"); err != nil {
			return err
		}
		return sc.ep.settings(f, sc.eachResp)
	case *http2.PingFrame:
		if f.IsAck() {
			sc.pingAcked.Store(true)
			return nil
		}
		if err := sc.pingPolicy(); err != nil {
			return err
		}
		sc.ep.ping(true, f.Data)
	case *http2.GoAwayFrame:
		// The client will open no more streams; the open ones finish.
		if f.ErrCode != http2.ErrCodeNo {
			sc.px.log.Debug("client sent GOAWAY", zap.String("peer", sc.peer), zap.Stringer("code", f.ErrCode))
		}
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	// PRIORITY and unknown frame types are ignored (RFC 9113 section 5.5).
	return nil
}

// tokenBucket is a budget of events: burst at once, a tenth of it earned
// back each second. A client may reset Config.MaxClientResets streams it
// opened at once (resetting streams as fast as they are opened,
// CVE-2023-44487 "rapid reset", is an attack, never a client's need), and
// make maxStrikes of the frames no well-behaved client sends more than a
// few of: SETTINGS, and requests the proxy refuses as malformed. Over
// either, the connection gets GOAWAY ENHANCE_YOUR_CALM.
type tokenBucket struct {
	tokens float64
	last   time.Time
}

// take spends one event of a budget of burst; false: over budget.
func (b *tokenBucket) take(burst float64) bool {
	now := time.Now()
	if b.last.IsZero() {
		b.tokens = burst
	} else {
		b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*burst/10)
	}
	b.last = now
	b.tokens--
	return b.tokens >= 0
}

// maxStrikes is the strike budget of a connection (see tokenBucket): 100
// at once, 10 a second. grpc-go clients send a few SETTINGS in a
// connection's life (its BDP estimator's window changes) and no
// malformed request.
const maxStrikes = 100

// strike spends a strike; over budget it returns the GOAWAY that ends the
// connection. Called by the reader.
func (sc *srvConn) strike(reason string) error {
	if sc.strikes.take(maxStrikes) {
		return nil
	}
	sc.px.log.Info("client connection abuses the protocol: GOAWAY ENHANCE_YOUR_CALM", zap.String("peer", sc.peer), zap.String("reason", reason))
	sc.px.shed(metrics.ShedAbuse)
	return &goAwayError{http2.ErrCodeEnhanceYourCalm, reason}
}

// errFrameTooLong: a frame (a header block with its CONTINUATIONs) is
// longer than maxFrameRead.
var errFrameTooLong = errors.New("frame longer than the proxy reads")

// maxFrameRead is the most one ReadFrame may read: a DATA frame, or a
// header block of at most maxHeaderList bytes (HPACK never makes it
// longer than twice that) in frames of at least 1 KiB. Empty
// CONTINUATION frames (CVE-2024-27316) run into it.
func maxFrameRead(maxHeaderList uint32) int {
	block := 2 * int(maxHeaderList)
	return max(maxFrameSize, block) + 9*(block/1024+2)
}

// frameBudget is the reader under a client's framer; it fails a read past
// left bytes.
type frameBudget struct {
	r    io.Reader
	left int
}

func (b *frameBudget) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, errFrameTooLong
	}
	if len(p) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	b.left -= n
	return n, err
}

// waitRoom pauses the connection's reader while it has more queued than
// its share (Config.MaxConnectionBuffer; an eighth of it while the proxy
// as a whole is over Config.MemoryBudget): what the client sends next is
// left in the socket, so a client that floods frames it never reads the
// answers to, or requests the enclave cannot take yet, slows only itself.
// A client that reads nothing for KeepaliveTimeout is disconnected.
func (sc *srvConn) waitRoom() error {
	px := sc.px
	limit := int64(px.cfg.MaxConnectionBuffer)
	over := func() bool {
		n := sc.acct.load()
		return n > limit || (n > limit/8 && px.mem.load() > px.cfg.MemoryBudget)
	}
	if !over() {
		return nil
	}
	px.shed(metrics.ShedReadPaused)
	t := time.NewTimer(px.cfg.Limits.KeepaliveTimeout)
	defer t.Stop()
	for {
		// Woken by the first byte this connection's account gives back
		// (its client read, or its requests went upstream), or, when it
		// is paused for the proxy's budget, the proxy's account: never by
		// polling, which cost a core per paused connection.
		own := sc.acct.drained()
		var all <-chan struct{}
		if sc.acct.load() <= limit {
			all = px.mem.drained()
		}
		if !over() {
			return nil
		}
		select {
		case <-own:
		case <-all:
		case <-px.stopping:
			return nil
		case <-t.C:
			if sc.ep.queued() > int(limit/8) {
				px.log.Info("client does not read what it asked for: connection closed",
					zap.String("peer", sc.peer), zap.Int64("queued_bytes", sc.acct.load()))
				return errNoRoom
			}
			t.Reset(px.cfg.Limits.KeepaliveTimeout)
		}
	}
}

// pingPolicy applies the keepalive enforcement policy: pings more often
// than KeepaliveMinTime are strikes; the third ends the connection with
// GOAWAY ENHANCE_YOUR_CALM "too_many_pings", as grpc-go servers do.
func (sc *srvConn) pingPolicy() error {
	now := time.Now()
	sc.ep.mu.Lock()
	if sc.ep.wrote {
		// As grpc-go: pings are fine while the server sends (BDP pings).
		sc.ep.wrote = false
		sc.pingStrikes = 0
		sc.lastPing = time.Time{}
	}
	sc.ep.mu.Unlock()
	if !sc.lastPing.IsZero() && now.Sub(sc.lastPing) < sc.px.cfg.Limits.KeepaliveMinTime {
		sc.pingStrikes++
	}
	sc.lastPing = now
	if sc.pingStrikes > 2 {
		sc.px.log.Debug("client pings too often: GOAWAY too_many_pings", zap.String("peer", sc.peer))
		sc.goAwayAndClose(http2.ErrCodeEnhanceYourCalm, "too_many_pings")
		return errGoAwaySent
	}
	return nil
}

// eachResp visits the response half of every open call (initial window
// change). Called with sc.ep.mu held.
func (sc *srvConn) eachResp(fn func(*half)) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	for _, c := range sc.calls {
		fn(&c.resp)
	}
}

func (sc *srvConn) call(id uint32) *call {
	sc.mu.Lock()
	c := sc.calls[id]
	sc.mu.Unlock()
	return c
}

func (sc *srvConn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	var h *half
	if f.StreamID != 0 {
		c := sc.call(f.StreamID)
		if c == nil {
			return nil // a stream that ended
		}
		h = &c.resp
	}
	if f.Increment == 0 {
		if h == nil {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if c := sc.call(f.StreamID); c != nil {
			c.clientReset(http2.ErrCodeProtocol)
		}
		sc.resetStream(f.StreamID, http2.ErrCodeProtocol)
		return nil
	}
	err := sc.ep.addWindow(h, f.Increment)
	var se http2.StreamError
	if errors.As(err, &se) {
		if c := sc.call(se.StreamID); c != nil {
			c.clientReset(http2.ErrCodeFlowControl)
		}
		sc.resetStream(se.StreamID, se.Code)
		return nil
	}
	return err
}

// resetStream sends RST_STREAM to the client for a stream the proxy does
// not relay (refused, or a protocol error on it).
func (sc *srvConn) resetStream(id uint32, code http2.ErrCode) {
	sc.ep.mu.Lock()
	sc.ep.writeRSTLocked(id, code)
	sc.ep.mu.Unlock()
}

func (sc *srvConn) onData(f *http2.DataFrame) error {
	id := f.StreamID
	if !sc.in.take(f.Length) {
		// More than the connection's window: a connection error
		// (RFC 9113 section 6.9.1).
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	// Connection credit goes back as soon as the bytes are read: each
	// stream's own window bounds what the proxy holds for it.
	sc.ep.windowUpdate(0, sc.in.give(int(f.Length)))
	c := sc.call(id)
	if c == nil {
		if id > sc.lastID.Load() || id%2 == 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil // a stream the proxy already ended: dropped
	}
	if !c.reqIn.take(f.Length) {
		c.clientReset(http2.ErrCodeFlowControl)
		sc.resetStream(id, http2.ErrCodeFlowControl)
		return nil
	}
	if c.reqEnded.Load() {
		// DATA after END_STREAM: a stream error (RFC 9113 section 5.1).
		c.fail(codes.Internal, "client sent DATA after END_STREAM")
		return nil
	}
	if pad := int(f.Length) - len(f.Data()); pad > 0 {
		// Padding counts against the window but is not relayed.
		c.credit(pad)
	}
	end := f.StreamEnded()
	if end {
		c.reqEnded.Store(true)
	}
	c.relayRequest(f.Data(), end)
	return nil
}

// onHeaders opens a call, or takes a client's trailers.
func (sc *srvConn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 == 0 {
		return &goAwayError{http2.ErrCodeProtocol, fmt.Sprintf("received an illegal stream id: %d (even: a server's)", id)}
	}
	if id <= sc.lastID.Load() {
		c := sc.call(id)
		if c == nil {
			// A closed stream (or an id below one already used): a
			// connection error, as grpc-go's and x/net's servers answer.
			// No gRPC client sends HEADERS after its request ended, so
			// even a stream the proxy reset gets no grace here (late DATA
			// on it is ignored, onData).
			return &goAwayError{http2.ErrCodeProtocol, fmt.Sprintf("HEADERS on closed stream %d", id)}
		}
		var code http2.ErrCode
		switch {
		case c.reqEnded.Load():
			code = http2.ErrCodeStreamClosed // half-closed (remote)
		case !f.StreamEnded(), len(f.PseudoFields()) > 0:
			// A second HEADERS is trailers: they end the stream and
			// carry no pseudo-header (RFC 9113 section 8.1).
			code = http2.ErrCodeProtocol
		}
		if code != 0 {
			c.clientReset(code)
			sc.resetStream(id, code)
			return nil
		}
		// Trailers from the client: gRPC has none to relay; they end the
		// request stream.
		c.reqEnded.Store(true)
		c.relayRequest(nil, true)
		return nil
	}
	if f.Truncated {
		// Over SETTINGS_MAX_HEADER_LIST_SIZE: reset, as grpc-go does.
		sc.mu.Lock()
		sc.lastID.Store(id)
		sc.mu.Unlock()
		sc.resetStream(id, http2.ErrCodeFrameSize)
		return sc.strike("too_many_malformed_requests")
	}
	return sc.px.openCall(sc, f)
}

// keeper runs the connection's timers: keepalive pings, idle and age.
func (sc *srvConn) keeper(done <-chan struct{}) {
	cfg := sc.px.cfg
	start := time.Now()
	age := jitter(cfg.Limits.MaxConnectionAge)
	tick := min(cfg.Limits.KeepaliveTime, time.Second)
	if cfg.Limits.MaxConnectionIdle > 0 {
		tick = min(tick, cfg.Limits.MaxConnectionIdle/4+time.Millisecond)
	}
	if age > 0 {
		tick = min(tick, age/4+time.Millisecond)
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	var pingSent time.Time
	for {
		select {
		case <-done:
			return
		case <-sc.px.stopping:
			sc.drain("", nil)
			return
		case now := <-t.C:
			if !pingSent.IsZero() {
				if sc.pingAcked.Load() || time.Unix(0, sc.lastRead.Load()).After(pingSent) {
					pingSent = time.Time{}
				} else if now.Sub(pingSent) > cfg.Limits.KeepaliveTimeout {
					sc.px.log.Debug("client did not answer a keepalive ping: connection closed", zap.String("peer", sc.peer))
					sc.ep.fail(errors.New("keepalive ping not answered"))
					return
				}
			} else if now.Sub(time.Unix(0, sc.lastRead.Load())) > cfg.Limits.KeepaliveTime {
				sc.pingAcked.Store(false)
				pingSent = now
				sc.ep.ping(false, [8]byte{'k', 'e', 'e', 'p'})
			}
			if cfg.Limits.MaxConnectionIdle > 0 {
				sc.mu.Lock()
				idle := len(sc.calls) == 0 && now.Sub(sc.lastCall) > cfg.Limits.MaxConnectionIdle
				sc.mu.Unlock()
				if idle {
					sc.drain("max_idle", nil)
					return
				}
			}
			if age > 0 && now.Sub(start) > age {
				var grace <-chan time.Time // 0: calls finish however long they take
				if cfg.Limits.MaxConnectionAgeGrace > 0 {
					grace = time.After(cfg.Limits.MaxConnectionAgeGrace)
				}
				sc.drain("max_age", grace)
				return
			}
		}
	}
}

// drain sends GOAWAY: the client opens no new streams here; the open ones
// finish, then the connection closes. grace (nil: none) cuts what is left.
func (sc *srvConn) drain(reason string, grace <-chan time.Time) {
	sc.mu.Lock()
	if sc.goAway {
		sc.mu.Unlock()
		return
	}
	sc.goAway = true
	n := len(sc.calls)
	sc.mu.Unlock()
	sc.ep.mu.Lock()
	if sc.ep.err == nil {
		_ = sc.ep.fr.WriteGoAway(sc.lastID.Load(), http2.ErrCodeNo, []byte(reason))
		sc.ep.flushLocked()
	}
	sc.ep.mu.Unlock()
	if n == 0 {
		sc.ep.drainAndClose(errGoAwaySent, time.Second)
		return
	}
	go func() {
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sc.done:
				return
			case <-grace:
				sc.ep.drainAndClose(errGoAwaySent, time.Second)
				return
			case <-t.C:
				sc.mu.Lock()
				n := len(sc.calls)
				sc.mu.Unlock()
				if n == 0 {
					sc.ep.drainAndClose(errGoAwaySent, time.Second)
					return
				}
			}
		}
	}()
}

// jitter returns d +- 10%.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	j := int64(d) / 10
	return d - time.Duration(j) + time.Duration(time.Now().UnixNano()%(2*j+1))
}

// debugEnabled reports whether calls are logged.
func debugEnabled(log *zap.Logger) bool { return log.Core().Enabled(zapcore.DebugLevel) }
