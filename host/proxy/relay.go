package proxy

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/internal/limits"
	"github.com/nitrosign/nitrosign/internal/requestid"
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

	fr *http2.Framer // reads; owned by serve

	// Read side, owned by serve.
	lastID      atomic.Uint32 // highest stream id the client opened; written by serve under mu
	recvUnacked uint32        // connection credit not yet returned
	pingStrikes int
	lastPing    time.Time

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
	_ = nc.SetDeadline(time.Now().Add(p.cfg.HandshakeTimeout))
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
			p.log.Debug("TLS handshake failed", zap.Stringer("peer", nc.RemoteAddr()), zap.Error(err))
			_ = nc.Close()
			return
		}
		nc = tc
	}
	ep := newEndpoint(nc)
	ep.closer = raw
	sc := &srvConn{
		px:    p,
		nc:    nc,
		ep:    ep,
		peer:  nc.RemoteAddr().String(),
		calls: map[uint32]*call{},
		done:  make(chan struct{}),
	}
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
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: sc.px.cfg.MaxConcurrentStreams},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: sc.px.cfg.MaxHeaderListSize},
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
	br := bufio.NewReaderSize(readTracker{sc.nc, &sc.lastRead}, 32<<10)
	sc.fr = http2.NewFramer(nil, br)
	sc.fr.SetMaxReadFrameSize(maxFrameSize)
	sc.fr.MaxHeaderListSize = px.cfg.MaxHeaderListSize
	sc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
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
		var f http2.Frame
		f, err = sc.fr.ReadFrame()
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
				err = nil
				continue
			}
			readErr = true
			break
		}
		err = sc.handle(f)
	}
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

// readTracker notes when bytes arrived (keepalive).
type readTracker struct {
	r    io.Reader
	last *atomic.Int64
}

func (t readTracker) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if n > 0 {
		t.last.Store(time.Now().UnixNano())
	}
	return n, err
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
		} else if f.StreamID > sc.lastID.Load() {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
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
	if !sc.lastPing.IsZero() && now.Sub(sc.lastPing) < sc.px.cfg.KeepaliveMinTime {
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

// connCredit returns connection-level credit for n bytes read, in batches.
func (sc *srvConn) connCredit(n uint32) {
	sc.recvUnacked += n
	if sc.recvUnacked >= connWindow/4 {
		sc.ep.windowUpdate(0, sc.recvUnacked)
		sc.recvUnacked = 0
	}
}

func (sc *srvConn) onData(f *http2.DataFrame) error {
	id := f.StreamID
	sc.connCredit(f.Length)
	c := sc.call(id)
	if c == nil {
		if id > sc.lastID.Load() || id%2 == 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil // a stream the proxy already ended: dropped
	}
	if c.reqRecv.Add(-int64(f.Length)) < 0 {
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
			// A stream the proxy ended (and reset) while the client was
			// still sending: ignored (RFC 9113 section 5.1).
			return nil
		}
		// Trailers from the client: gRPC has none to relay; they end the
		// request stream.
		if !f.StreamEnded() {
			c.fail(codes.Internal, "client sent a second HEADERS without END_STREAM")
			return nil
		}
		if !c.reqEnded.Load() {
			c.reqEnded.Store(true)
			c.relayRequest(nil, true)
		}
		return nil
	}
	if f.Truncated {
		// Over SETTINGS_MAX_HEADER_LIST_SIZE: reset, as grpc-go does.
		sc.mu.Lock()
		sc.lastID.Store(id)
		sc.mu.Unlock()
		sc.resetStream(id, http2.ErrCodeFrameSize)
		return nil
	}
	sc.px.openCall(sc, f)
	return nil
}

// keeper runs the connection's timers: keepalive pings, idle and age.
func (sc *srvConn) keeper(done <-chan struct{}) {
	cfg := sc.px.cfg
	start := time.Now()
	age := jitter(cfg.MaxConnectionAge)
	tick := min(cfg.KeepaliveTime, time.Second)
	if cfg.MaxConnectionIdle > 0 {
		tick = min(tick, cfg.MaxConnectionIdle/4+time.Millisecond)
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
				} else if now.Sub(pingSent) > cfg.KeepaliveTimeout {
					sc.px.log.Debug("client did not answer a keepalive ping: connection closed", zap.String("peer", sc.peer))
					sc.ep.fail(errors.New("keepalive ping not answered"))
					return
				}
			} else if now.Sub(time.Unix(0, sc.lastRead.Load())) > cfg.KeepaliveTime {
				sc.pingAcked.Store(false)
				pingSent = now
				sc.ep.ping(false, [8]byte{'k', 'e', 'e', 'p'})
			}
			if cfg.MaxConnectionIdle > 0 {
				sc.mu.Lock()
				idle := len(sc.calls) == 0 && now.Sub(sc.lastCall) > cfg.MaxConnectionIdle
				sc.mu.Unlock()
				if idle {
					sc.drain("max_idle", nil)
					return
				}
			}
			if age > 0 && now.Sub(start) > age {
				sc.drain("max_age", time.After(cfg.MaxConnectionAgeGrace))
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

// --- calls ----------------------------------------------------------------

// call is one relayed stream.
type call struct {
	px     *Proxy
	sc     *srvConn
	sid    uint32 // stream id on the client connection
	ln     *lane  // nil until routed
	uid    uint32 // stream id on the lane
	method string
	reqID  string
	start  time.Time
	slot   bool // holds an in-flight slot

	req  half // toward the lane (dst: ln.ep)
	resp half // toward the client (dst: sc.ep)

	// Read by the client's reader only.
	reqEnded atomic.Bool // END_STREAM received from the client
	msg      msgLimit    // request message framing
	respMsg  msgLimit    // response message framing; the lane's reader only
	// Receive windows the proxy gave each sender on this stream.
	reqRecv  atomic.Int64
	respRecv atomic.Int64
	// Credit owed to each sender, returned in batches.
	reqOwed  atomic.Int64
	respOwed atomic.Int64

	headersSent bool // response headers went to the client; under sc.ep.mu

	deadline time.Time // zero: none; set before the call is shared
	timerMu  sync.Mutex
	timer    *time.Timer
	finished atomic.Bool
	observed atomic.Bool
	code     atomic.Int32 // final status
	upErr    atomic.Bool  // the status is the upstream's failure (metrics)
}

// openCall routes a new stream.
func (p *Proxy) openCall(sc *srvConn, f *http2.MetaHeadersFrame) {
	c := &call{px: p, sc: sc, sid: f.StreamID, start: time.Now()}
	c.reqRecv.Store(streamWindow)
	c.respRecv.Store(streamWindow)
	c.resp = half{dst: sc.ep, id: f.StreamID, onSent: c.respSent}
	sc.ep.mu.Lock()
	c.resp.window = sc.ep.initWin
	sc.ep.mu.Unlock()
	c.method = f.PseudoValue("path")
	c.reqEnded.Store(f.StreamEnded())
	// The stream id, the GOAWAY check and the call's registration are one
	// step: a drain (GOAWAY with lastID) sees either the call or a stream
	// it refused.
	sc.mu.Lock()
	sc.lastID.Store(c.sid)
	switch {
	case sc.goAway:
		sc.mu.Unlock()
		sc.resetStream(c.sid, http2.ErrCodeRefusedStream)
		return
	case len(sc.calls) >= int(p.cfg.MaxConcurrentStreams):
		sc.mu.Unlock()
		sc.resetStream(c.sid, http2.ErrCodeRefusedStream)
		return
	}
	sc.calls[c.sid] = c
	sc.mu.Unlock()

	p.obs.CallStarted(c.method)
	fields, timeout, err := p.requestHeaders(c, f)
	if err != nil {
		c.answerHTTP(err.code, err.msg, err.http)
		return
	}
	if !limits.Exempt(c.method) {
		if err := p.inFlight.Acquire(); err != nil {
			c.answer(codes.ResourceExhausted, statusMessage(err))
			return
		}
		c.slot = true
	}
	ln, uerr := p.route(c.method)
	if uerr != nil {
		p.obs.UpstreamError(metrics.ReasonNoReadyConnection)
		c.upErr.Store(true)
		c.answer(codes.Unavailable, uerr.Error())
		return
	}
	if timeout > 0 {
		c.deadline = c.start.Add(timeout)
	}
	if err := ln.open(c, fields, c.reqEnded.Load()); err != nil {
		p.obs.UpstreamError(metrics.ReasonNoReadyConnection)
		c.upErr.Store(true)
		c.answer(codes.Unavailable, err.Error())
		return
	}
	if timeout > 0 {
		c.timerMu.Lock()
		if !c.finished.Load() {
			c.timer = time.AfterFunc(timeout, c.expire)
		}
		c.timerMu.Unlock()
	}
}

// statusError is a status the proxy answers a call with.
type statusError struct {
	code codes.Code
	msg  string
	http int // the HTTP status of the answer; 0: 200
}

// statusMessage is err's message without "rpc error: code = X desc = ".
func statusMessage(err error) string {
	s := err.Error()
	if i := strings.Index(s, "desc = "); i >= 0 {
		return s[i+len("desc = "):]
	}
	return s
}

// hopField reports the fields that are connection-specific (RFC 9113
// section 8.2.2) and never relayed; grpc-timeout and x-request-id are
// rewritten, not relayed.
func hopField(name string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host",
		"grpc-timeout", requestid.Key:
		return true
	}
	return false
}

// requestHeaders checks a request's headers and builds the upstream's.
func (p *Proxy) requestHeaders(c *call, f *http2.MetaHeadersFrame) ([]hpack.HeaderField, time.Duration, *statusError) {
	var (
		out       = make([]hpack.HeaderField, 0, len(f.Fields)+2)
		timeout   time.Duration
		hasTO     bool
		ct        string
		host      string
		size      int
		headerErr *statusError
	)
	authority := f.PseudoValue("authority")
	out = append(out,
		hpack.HeaderField{Name: ":method", Value: "POST"},
		hpack.HeaderField{Name: ":scheme", Value: "http"},
		hpack.HeaderField{Name: ":path", Value: c.method},
		hpack.HeaderField{}, // :authority, below
	)
	for _, hf := range f.RegularFields() {
		size += len(hf.Name) + len(hf.Value) + 32
		switch hf.Name {
		case "content-type":
			ct = hf.Value
		case "grpc-timeout":
			d, ok := parseTimeout(hf.Value)
			if !ok && headerErr == nil {
				headerErr = &statusError{codes.Internal, fmt.Sprintf("malformed grpc-timeout: %q", hf.Value), 400}
			}
			timeout, hasTO = d, true
			continue
		case requestid.Key:
			if c.reqID == "" && requestid.Valid(hf.Value) {
				c.reqID = hf.Value
			}
			continue
		case "host":
			host = hf.Value
		}
		if hopField(hf.Name) {
			continue
		}
		if strings.HasSuffix(hf.Name, "-bin") {
			if !validBinHeader(hf.Value) && headerErr == nil {
				headerErr = &statusError{codes.Internal, fmt.Sprintf("malformed binary metadata %q in header %q", hf.Value, hf.Name), 400}
			}
		} else if err := limits.ValidateEntry(hf.Name, hf.Value); err != nil && headerErr == nil {
			headerErr = &statusError{codes.InvalidArgument, statusMessage(err), 0}
		}
		out = append(out, hf)
	}
	// The checks and their answers follow grpc-go's server, so a client
	// sees the same status through the proxy as from the enclave.
	if !isGRPCContentType(ct) {
		return nil, 0, &statusError{codes.InvalidArgument, fmt.Sprintf("invalid gRPC request content-type %q", ct), 415}
	}
	if m := f.PseudoValue("method"); m != "POST" {
		return nil, 0, &statusError{codes.Internal, fmt.Sprintf("invalid gRPC request method %q", m), 405}
	}
	if authority == "" {
		authority = host
	}
	if authority == "" {
		return nil, 0, &statusError{codes.Internal, "no host or :authority header present", 400}
	}
	out[3] = hpack.HeaderField{Name: ":authority", Value: authority}
	if headerErr != nil {
		return nil, 0, headerErr
	}
	if !strings.HasPrefix(c.method, "/") {
		return nil, 0, &statusError{codes.Unimplemented, fmt.Sprintf("malformed method name: %q", c.method), 0}
	}
	if size > p.cfg.MaxMetadataSize {
		return nil, 0, &statusError{codes.ResourceExhausted, fmt.Sprintf(
			"request metadata is %d bytes (names + values + 32 per entry), limit %d", size, p.cfg.MaxMetadataSize), 0}
	}
	if c.reqID == "" {
		c.reqID = requestid.New()
	}
	// Values that change with every call are never indexed (Sensitive):
	// in the connection's HPACK table they would only push out the
	// entries that repeat.
	out = append(out, hpack.HeaderField{Name: requestid.Key, Value: c.reqID, Sensitive: true})
	if !hasTO && p.unary[c.method] {
		timeout, hasTO = p.cfg.DefaultCallTimeout, true
	}
	if hasTO {
		out = append(out, hpack.HeaderField{Name: "grpc-timeout", Value: formatTimeout(timeout), Sensitive: true})
	}
	return out, timeout, nil
}

// isGRPCContentType reports whether ct is application/grpc or one of its
// subtypes (application/grpc+proto, application/grpc;...).
func isGRPCContentType(ct string) bool {
	if !strings.HasPrefix(ct, "application/grpc") {
		return false
	}
	rest := ct[len("application/grpc"):]
	return rest == "" || rest[0] == '+' || rest[0] == ';'
}

// validBinHeader reports whether v is base64, padded or not, as gRPC
// carries -bin metadata values.
func validBinHeader(v string) bool {
	enc := base64.RawStdEncoding
	if len(v)%4 == 0 {
		enc = base64.StdEncoding
	}
	var scratch [256]byte
	for len(v) > 0 {
		// Decode in chunks of whole quanta so no value is too large.
		n := min(len(v), 340)
		if n < len(v) {
			n -= n % 4
		}
		if _, err := enc.Decode(scratch[:], []byte(v[:n])); err != nil {
			return false
		}
		v = v[n:]
		if len(v) > 0 && len(v)%4 == 0 {
			enc = base64.StdEncoding
		}
	}
	return true
}

// relayRequest passes request bytes (and the end of the request) upstream.
// Called by the client's reader.
func (c *call) relayRequest(data []byte, end bool) {
	if c.ln == nil {
		// Answered by the proxy: the bytes are dropped, credit returned.
		c.credit(len(data))
		return
	}
	if err := c.msg.check(data, c.px.cfg.MaxRecvMsgSize); err != nil {
		c.fail(codes.ResourceExhausted, err.Error())
		return
	}
	ep := c.ln.ep
	ep.mu.Lock()
	n, ended := c.req.sendLocked(data, end, nil)
	ep.mu.Unlock()
	if n > 0 || ended {
		c.reqSent(n, ended)
	}
}

// reqSent: n request bytes went upstream; return the credit to the client.
func (c *call) reqSent(n int, _ bool) { c.credit(n) }

// credit returns n bytes of stream credit to the client (batched).
func (c *call) credit(n int) {
	if n <= 0 || c.reqEnded.Load() {
		return
	}
	if owed := c.reqOwed.Add(int64(n)); owed >= streamWindow/4 {
		if c.reqOwed.CompareAndSwap(owed, 0) {
			c.reqRecv.Add(owed)
			c.sc.ep.windowUpdate(c.sid, uint32(owed))
		}
	}
}

// respSent: n response bytes reached the client; return the credit
// upstream. ended: the response is complete and the call is over.
func (c *call) respSent(n int, ended bool) {
	if n > 0 && !ended && c.ln != nil {
		if owed := c.respOwed.Add(int64(n)); owed >= streamWindow/4 {
			if c.respOwed.CompareAndSwap(owed, 0) {
				c.respRecv.Add(owed)
				c.ln.ep.windowUpdate(c.uid, uint32(owed))
			}
		}
	}
	if ended {
		c.finish()
	}
}

// answer ends the call with the proxy's own status, before anything came
// from upstream.
func (c *call) answer(code codes.Code, msg string) { c.answerHTTP(code, msg, 0) }

// answerHTTP is answer with an HTTP status other than 200 (malformed
// requests, as gRPC's spec asks) when no response headers went out yet.
func (c *call) answerHTTP(code codes.Code, msg string, httpStatus int) {
	c.code.Store(int32(code))
	c.observe()
	ep := c.sc.ep
	ep.mu.Lock()
	c.resp.q, c.resp.qEnd, c.resp.trailers = nil, false, nil
	if !c.resp.closed {
		fields := statusFields(code, msg, c.headersSent)
		if httpStatus != 0 && !c.headersSent {
			fields[0].Value = strconv.Itoa(httpStatus)
		}
		ep.writeHeadersLocked(c.sid, fields, true)
		c.resp.closed = true
		c.headersSent = true
	}
	if !c.reqEnded.Load() {
		// The client may still be sending: tell it to stop (grpc-go does
		// the same when a server ends a call first).
		ep.writeRSTLocked(c.sid, http2.ErrCodeNo)
	}
	ep.mu.Unlock()
	c.finish()
}

// fail ends a routed call with the proxy's status: upstream is cancelled.
func (c *call) fail(code codes.Code, msg string) {
	c.cancelUpstream()
	c.answer(code, msg)
}

// cancelUpstream resets the upstream stream and forgets it.
func (c *call) cancelUpstream() { c.cancelUpstreamCode(http2.ErrCodeCancel) }

// cancelUpstreamCode resets the upstream stream with code and forgets it.
func (c *call) cancelUpstreamCode(code http2.ErrCode) {
	if c.ln == nil {
		return
	}
	ep := c.ln.ep
	ep.mu.Lock()
	c.req.resetLocked(code)
	ep.mu.Unlock()
	c.ln.forget(c)
}

// expire is the call's deadline.
func (c *call) expire() {
	if c.finished.Load() {
		return
	}
	c.fail(codes.DeadlineExceeded, "deadline exceeded (proxy)")
}

// clientReset: the client reset the stream.
func (c *call) clientReset(code http2.ErrCode) {
	c.code.Store(int32(codeFromRST(code)))
	c.cancelUpstream()
	ep := c.sc.ep
	ep.mu.Lock()
	c.resp.closed = true
	c.resp.q, c.resp.qEnd, c.resp.trailers = nil, false, nil
	ep.mu.Unlock()
	c.finish()
}

// clientGone: the client connection ended.
func (c *call) clientGone() {
	if c.finished.Load() {
		return
	}
	c.code.Store(int32(codes.Canceled))
	c.cancelUpstream()
	c.finish()
}

// upstreamLost: the lane broke; the call fails Unavailable.
func (c *call) upstreamLost(reason string) {
	if c.finished.Load() {
		return
	}
	c.px.obs.UpstreamError(metrics.ReasonUnavailable)
	c.upErr.Store(true)
	c.answer(codes.Unavailable, reason)
}

// finish does the bookkeeping of a call that ended, once.
func (c *call) finish() {
	if !c.finished.CompareAndSwap(false, true) {
		return
	}
	c.timerMu.Lock()
	if c.timer != nil {
		c.timer.Stop()
	}
	c.timerMu.Unlock()
	if c.ln != nil {
		c.ln.forget(c)
	}
	sc := c.sc
	sc.mu.Lock()
	delete(sc.calls, c.sid)
	if len(sc.calls) == 0 {
		sc.lastCall = time.Now()
	}
	sc.mu.Unlock()
	c.observe()
}

// observe records the call's outcome once: it frees the in-flight slot,
// counts the call in the metrics and logs it. It runs before the end of
// the response goes to the client (and from finish, for the paths where
// nothing does), so a client that has its answer sees the call counted
// and its slot free, as with a gRPC server's interceptors.
func (c *call) observe() {
	if !c.observed.CompareAndSwap(false, true) {
		return
	}
	if c.slot {
		c.px.inFlight.Release()
	}
	code := codes.Code(c.code.Load())
	elapsed := time.Since(c.start)
	c.px.obs.CallFinished(c.method, code, elapsed)
	if !c.upErr.Load() && c.ln != nil {
		switch code {
		case codes.Unavailable:
			c.px.obs.UpstreamError(metrics.ReasonUnavailable)
		case codes.Internal, codes.Unknown, codes.DataLoss:
			c.px.obs.UpstreamError(metrics.ReasonServerFault)
		}
	}
	if c.px.debug {
		c.px.log.Debug("call", zap.String("method", c.method), zap.Stringer("code", code),
			zap.Duration("latency", elapsed), zap.String(requestid.LogField, c.reqID), zap.String("peer", c.sc.peer))
	}
}

// --- from upstream ---------------------------------------------------------

// upHeaders relays response headers or trailers. Called by the lane's reader.
func (c *call) upHeaders(f *http2.MetaHeadersFrame) {
	end := f.StreamEnded()
	fields := f.Fields
	if end {
		code := codes.Unknown
		if v := f.PseudoValue("status"); v != "" && v != "200" && c.isFirstHeaders() {
			code = httpStatusCode(v)
		}
		for _, hf := range f.RegularFields() {
			if hf.Name == "grpc-status" {
				if n, err := strconv.Atoi(hf.Value); err == nil {
					code = codes.Code(n)
				}
			}
		}
		c.code.Store(int32(code))
		c.observe()
	}
	ep := c.sc.ep
	ep.mu.Lock()
	if !end {
		if c.headersSent || c.resp.closed {
			ep.mu.Unlock()
			c.fail(codes.Internal, "upstream sent response headers twice")
			return
		}
		c.headersSent = true
		if ep.err == nil && !c.resp.closed {
			ep.writeHeadersLocked(c.sid, fields, false)
		}
		ep.mu.Unlock()
		return
	}
	c.headersSent = true
	n, ended := c.resp.sendLocked(nil, true, fields)
	if ended && !c.reqEnded.Load() {
		ep.writeRSTLocked(c.sid, http2.ErrCodeNo)
	}
	ep.mu.Unlock()
	c.upDone()
	if n > 0 || ended {
		c.respSent(n, ended)
	}
}

// isFirstHeaders reports whether no response headers were relayed yet.
func (c *call) isFirstHeaders() bool {
	c.sc.ep.mu.Lock()
	defer c.sc.ep.mu.Unlock()
	return !c.headersSent
}

// upDone: upstream ended its side; the request side stops there too.
func (c *call) upDone() {
	ep := c.ln.ep
	ep.mu.Lock()
	c.req.closed, c.req.over = true, true
	c.req.q, c.req.qEnd = nil, false
	ep.mu.Unlock()
	c.ln.forget(c)
}

// upData relays response bytes. Called by the lane's reader.
func (c *call) upData(data []byte, end bool) {
	if err := c.respMsg.check(data, c.px.cfg.MaxSendMsgSize); err != nil {
		c.fail(codes.ResourceExhausted, "response from the enclave refused: "+err.Error())
		return
	}
	if end {
		// END_STREAM on DATA: no trailers, no status (grpc-go says Internal).
		c.code.Store(int32(codes.Internal))
		c.observe()
	}
	ep := c.sc.ep
	ep.mu.Lock()
	n, ended := c.resp.sendLocked(data, end, nil)
	ep.mu.Unlock()
	if end {
		c.upDone()
	}
	if n > 0 || ended {
		c.respSent(n, ended)
	}
}

// upReset: upstream reset the stream.
func (c *call) upReset(code http2.ErrCode) {
	c.ln.forget(c)
	ep := c.ln.ep
	ep.mu.Lock()
	c.req.closed, c.req.over = true, true
	ep.mu.Unlock()
	st := codeFromRST(code)
	if code == http2.ErrCodeCancel && !c.deadline.IsZero() && !time.Now().Before(c.deadline) {
		// The enclave's copy of the deadline expired (grpc-go servers
		// reset with CANCEL then); the caller's deadline has too.
		c.answer(codes.DeadlineExceeded, "deadline exceeded")
		return
	}
	c.answer(st, fmt.Sprintf("upstream reset the stream: %s", code))
}

// httpStatusCode maps a non-200 HTTP status to a gRPC code (gRPC's
// http-grpc-status-mapping).
func httpStatusCode(s string) codes.Code {
	switch s {
	case "400":
		return codes.Internal
	case "401":
		return codes.Unauthenticated
	case "403":
		return codes.PermissionDenied
	case "404":
		return codes.Unimplemented
	case "429", "502", "503", "504":
		return codes.Unavailable
	default:
		return codes.Unknown
	}
}

// msgLimit follows the gRPC length-prefixed messages of one direction and
// refuses a message larger than the limit before it is relayed.
type msgLimit struct {
	hdr  [5]byte
	have int    // header bytes seen of the current message
	left uint32 // body bytes left of the current message
}

func (m *msgLimit) check(data []byte, limit int) error {
	for len(data) > 0 {
		if m.left > 0 {
			n := min(uint32(len(data)), m.left)
			m.left -= n
			data = data[n:]
			continue
		}
		n := copy(m.hdr[m.have:], data)
		m.have += n
		data = data[n:]
		if m.have < 5 {
			return nil
		}
		m.have = 0
		size := uint32(m.hdr[1])<<24 | uint32(m.hdr[2])<<16 | uint32(m.hdr[3])<<8 | uint32(m.hdr[4])
		if int64(size) > int64(limit) {
			return fmt.Errorf("grpc: received message larger than max (%d vs. %d)", size, limit)
		}
		m.left = size
	}
	return nil
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
