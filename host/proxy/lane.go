package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// A lane is one HTTP/2 connection to an upstream (an enclave, or the
// proxy's own health server) carrying relayed streams and the proxy's own
// probes. Its slot dials it, watches its health and replaces it.

// upStream is what a lane carries: a client's call or one of the proxy's
// own probes. The lane's reader calls the on* methods.
type upStream interface {
	// attach gives the stream its id on l and makes its request half;
	// called under l.ep.mu and l.mu.
	attach(l *lane, id uint32)
	// reqHalf is the half sending on the lane (under l.ep.mu).
	reqHalf() *half
	// sink is the connection the stream's responses are relayed to (the
	// lane itself for the proxy's own calls).
	sink() *endpoint
	onHeaders(l *lane, f *http2.MetaHeadersFrame)
	onData(l *lane, f *http2.DataFrame)
	// onWindowOverflow: the upstream's WINDOW_UPDATE overflowed the
	// stream's send window.
	onWindowOverflow(l *lane)
	onReset(l *lane, code http2.ErrCode)
	// lost: the lane ended with the stream open, or refused it (GOAWAY).
	// refused: the upstream never saw the stream, so it is safe to retry.
	lost(l *lane, reason string, refused bool)
}

type lane struct {
	slot  *slot
	fr    *frameReader  // reads; set by connect, owned by serve
	br    *bufio.Reader // under fr
	batch flushBatch    // owned by serve
	ep    *endpoint

	mu         sync.Mutex // guards the fields below; taken after ep.mu when both are
	streams    map[uint32]upStream
	nextID     uint32
	maxStreams uint32
	maxHeaders uint32 // the upstream's SETTINGS_MAX_HEADER_LIST_SIZE
	goAway     bool
	dead       bool
	// draining is closed when the lane takes no more calls (GOAWAY, or
	// its stream ids are used up): its slot dials a replacement at once.
	draining     chan struct{}
	drainingOnce sync.Once

	in        *inflow // the connection's receive window
	lastRead  atomic.Int64
	pingAcked atomic.Bool
}

// dialLane dials and does the HTTP/2 handshake.
func dialLane(ctx context.Context, s *slot) (*lane, error) {
	cfg := s.up.set.cfg
	ctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	defer cancel()
	nc, err := s.up.dial(ctx)
	if err != nil {
		return nil, err
	}
	l := &lane{slot: s, ep: newEndpoint(nc, s.up.set.mem), in: newInflow(connWindow), streams: map[uint32]upStream{}, nextID: 1,
		maxStreams: 100, maxHeaders: 1<<32 - 1, draining: make(chan struct{})}
	ep := l.ep
	// The preface and settings go out first; the server's SETTINGS must
	// come back within the connect timeout.
	ep.mu.Lock()
	ep.buf.WriteString(http2.ClientPreface)
	_ = ep.fr.WriteSettings(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
	)
	_ = ep.fr.WriteWindowUpdate(0, connWindow-65535)
	ep.mu.Unlock()
	_ = nc.SetDeadline(time.Now().Add(cfg.ConnectTimeout))
	// Written while the server's SETTINGS are read: on an unbuffered
	// connection (the in-memory one) each side writes before it reads.
	hello := bytes.Clone(ep.buf.Bytes())
	ep.buf.Reset()
	wrote := make(chan error, 1)
	go func() {
		_, err := nc.Write(hello)
		wrote <- err
	}()
	br := bufio.NewReaderSize(newSockReader(nc, &l.lastRead), 32<<10)
	fr := newFrameReader(br, 0)
	f, err := fr.ReadFrame()
	if err != nil {
		_ = nc.Close()
		<-wrote
		return nil, fmt.Errorf("HTTP/2 handshake: reading the server's SETTINGS: %w", err)
	}
	if err := <-wrote; err != nil {
		_ = nc.Close()
		return nil, fmt.Errorf("HTTP/2 handshake: %w", err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		_ = nc.Close()
		return nil, fmt.Errorf("HTTP/2 handshake: first frame is %s, not SETTINGS", f.Header().Type)
	}
	_ = nc.SetDeadline(time.Time{})
	if err := l.applySettings(sf); err != nil {
		_ = nc.Close()
		return nil, fmt.Errorf("HTTP/2 handshake: %w", err)
	}
	l.lastRead.Store(time.Now().UnixNano())
	l.fr, l.br = fr, br
	return l, nil
}

// applySettings applies the server's SETTINGS and acknowledges them.
func (l *lane) applySettings(f *http2.SettingsFrame) error {
	if err := l.ep.settings(f, l.eachReq); err != nil {
		return err
	}
	l.mu.Lock()
	if v, ok := f.Value(http2.SettingMaxConcurrentStreams); ok {
		l.maxStreams = v
	}
	if v, ok := f.Value(http2.SettingMaxHeaderListSize); ok {
		l.maxHeaders = v
	}
	l.mu.Unlock()
	return nil
}

// maxHeaderList is the largest header list the upstream accepts.
func (l *lane) maxHeaderList() uint32 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.maxHeaders
}

// eachReq visits the request half of every stream on the lane (ep.mu held).
func (l *lane) eachReq(fn func(*half)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.streams {
		fn(s.reqHalf())
	}
}

// drainLocked marks the lane as taking no new streams (l.mu held).
func (l *lane) drainLocked() {
	l.goAway = true
	l.drainingOnce.Do(func() { close(l.draining) })
}

// ready reports whether the lane takes new streams.
func (l *lane) ready() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.dead && !l.goAway
}

// lastLaneStreamID is the last stream id a lane uses before it is
// replaced (a variable so tests can reach it quickly).
var lastLaneStreamID uint32 = maxStreamID - 2

// errLaneFull: the lane has as many streams as the upstream allows.
var errLaneFull = errors.New("upstream connection has no free stream")

// open starts s on the lane with the request headers fields.
func (l *lane) open(s upStream, fields []hpack.HeaderField, end bool) error {
	exhausted, err := l.openLocked(s, fields, end)
	if exhausted {
		// Its stream ids are used up: it takes no more streams, closes
		// when the last one ends (forget), and its slot dials another.
		l.slot.up.set.log.Info("upstream connection used up its stream ids: replacing it",
			zap.String("upstream", l.slot.up.name), zap.Int("slot", l.slot.idx))
		l.slot.up.set.changed()
	}
	return err
}

// openLocked is open; exhausted reports that this stream took the last
// stream id the lane may use.
func (l *lane) openLocked(s upStream, fields []hpack.HeaderField, end bool) (exhausted bool, err error) {
	ep := l.ep
	ep.mu.Lock()
	defer ep.mu.Unlock()
	l.mu.Lock()
	switch {
	case l.dead || ep.err != nil:
		l.mu.Unlock()
		return false, errors.New("upstream connection lost before the call could start")
	case l.goAway:
		l.mu.Unlock()
		return false, errors.New("upstream connection is draining")
	case uint32(len(l.streams)) >= l.maxStreams:
		l.mu.Unlock()
		return false, errLaneFull
	}
	id := l.nextID
	l.nextID += 2
	if l.nextID > lastLaneStreamID {
		l.drainLocked()
		exhausted = true
	}
	s.attach(l, id)
	l.streams[id] = s
	l.mu.Unlock()
	l.slot.calls.Add(1)
	ep.writeHeadersLocked(id, fields, end)
	if end {
		s.reqHalf().closed = true
	}
	return exhausted, nil
}

// forget removes stream id (if it is still s) from the lane.
func (l *lane) forget(s upStream, id uint32) {
	l.mu.Lock()
	if l.streams[id] == s {
		delete(l.streams, id)
	}
	closeNow := l.goAway && len(l.streams) == 0
	l.mu.Unlock()
	if closeNow {
		l.ep.fail(errors.New("upstream GOAWAY: drained"))
	}
}

func (l *lane) lookup(id uint32) upStream {
	l.mu.Lock()
	s := l.streams[id]
	l.mu.Unlock()
	return s
}

// load is the number of streams open on the lane.
func (l *lane) load() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.streams)
}

// serve reads the lane until it fails; then every stream on it is lost.
// It returns why the lane ended.
func (l *lane) serve() (err error) {
	go l.ep.run(func(error) {})
	done := make(chan struct{})
	go l.keeper(done)
	defer func() {
		if v := recover(); v != nil {
			l.slot.up.set.log.Error("panic relaying from upstream: connection closed", zap.Any("panic", v), zap.Stack("stack"))
			err = fmt.Errorf("panic: %v", v)
		}
		close(done)
		l.ep.fail(err)
		<-l.ep.done
		l.mu.Lock()
		l.dead = true
		l.drainingOnce.Do(func() { close(l.draining) })
		streams := l.streams
		l.streams = map[uint32]upStream{}
		l.mu.Unlock()
		msg := "upstream connection lost: " + rootMessage(err)
		for _, s := range streams {
			s.lost(l, msg, false)
		}
	}()
	l.batch.own = l.ep
	defer l.batch.flush()
	for {
		f, err := l.fr.ReadFrame()
		if err != nil {
			return err
		}
		l.ep.corked(&l.batch, func() { err = l.handle(f) })
		if err != nil {
			return err
		}
		if l.br.Buffered() == 0 {
			l.batch.flush() // nothing more to read without waiting
		}
	}
}

// rootMessage is a short reason for a lane's end.
func rootMessage(err error) string {
	switch {
	case err == nil:
		return "closed"
	case errors.Is(err, io.EOF):
		return "closed by the enclave"
	default:
		return err.Error()
	}
}

func (l *lane) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		if s := l.lookup(f.StreamID); s != nil {
			s.sink().corked(&l.batch, func() { s.onHeaders(l, f) })
		}
	case *http2.DataFrame:
		if !l.in.take(f.Length) {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		// Connection credit goes back as soon as the bytes are read:
		// each stream's own window bounds what the proxy holds for it,
		// so one stalled stream never holds up the others.
		l.ep.windowUpdate(0, l.in.give(int(f.Length)))
		if s := l.lookup(f.StreamID); s != nil {
			s.sink().corked(&l.batch, func() { s.onData(l, f) })
		}
	case *http2.WindowUpdateFrame:
		var h *half
		var s upStream
		if f.StreamID != 0 {
			if s = l.lookup(f.StreamID); s == nil {
				return nil
			}
			l.ep.mu.Lock()
			h = s.reqHalf()
			l.ep.mu.Unlock()
		}
		err := l.ep.addWindow(h, f.Increment)
		var se http2.StreamError
		if errors.As(err, &se) {
			// One stream's window overflowed: that stream fails, the
			// connection and its other streams go on.
			s.onWindowOverflow(l)
			return nil
		}
		if err != nil {
			return err
		}
	case *http2.RSTStreamFrame:
		if s := l.lookup(f.StreamID); s != nil {
			l.forget(s, f.StreamID)
			s.onReset(l, f.ErrCode)
		}
	case *http2.SettingsFrame:
		if !f.IsAck() {
			return l.applySettings(f)
		}
	case *http2.PingFrame:
		if f.IsAck() {
			l.pingAcked.Store(true)
			return nil
		}
		l.ep.ping(true, f.Data)
	case *http2.GoAwayFrame:
		l.onGoAway(f)
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil
}

// onGoAway: the upstream is draining. Streams it did not take are lost as
// refused (safe to retry elsewhere); the others finish; then the lane
// closes, and its slot has already dialled a replacement.
func (l *lane) onGoAway(f *http2.GoAwayFrame) {
	l.mu.Lock()
	l.drainLocked()
	var refused []upStream
	for id, s := range l.streams {
		if id > f.LastStreamID {
			refused = append(refused, s)
			delete(l.streams, id)
		}
	}
	empty := len(l.streams) == 0
	l.mu.Unlock()
	l.slot.up.set.changed()
	for _, s := range refused {
		l.ep.mu.Lock()
		h := s.reqHalf()
		h.closed, h.over = true, true
		h.dropQueue()
		l.ep.mu.Unlock()
		s.lost(l, "upstream is shutting down (GOAWAY): call not started", true)
	}
	if empty {
		l.ep.fail(errors.New("upstream GOAWAY"))
	}
}

// keeper pings an idle lane (Config.Pool.KeepaliveTime) and closes it when
// the ping is not answered within KeepaliveTimeout.
func (l *lane) keeper(done <-chan struct{}) {
	kt, kto := l.slot.up.keepalive, l.slot.up.set.cfg.KeepaliveTimeout
	if kt <= 0 {
		return
	}
	t := time.NewTicker(min(kt, time.Second))
	defer t.Stop()
	var pingSent time.Time
	for {
		select {
		case <-done:
			return
		case now := <-t.C:
			switch {
			case !pingSent.IsZero():
				if l.pingAcked.Load() {
					pingSent = time.Time{}
				} else if now.Sub(pingSent) > kto {
					l.ep.fail(errors.New("upstream did not answer a keepalive ping"))
					return
				}
			case now.Sub(time.Unix(0, l.lastRead.Load())) > kt:
				l.pingAcked.Store(false)
				pingSent = now
				l.ep.ping(false, [8]byte{'l', 'a', 'n', 'e'})
			}
		}
	}
}

// pipeListener hands the server ends of in-memory connections to a
// grpc.Server (the proxy's own health service).
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (pl *pipeListener) dial(ctx context.Context) (net.Conn, error) {
	c, s := net.Pipe()
	select {
	case pl.conns <- s:
		return c, nil
	case <-pl.done:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (pl *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-pl.conns:
		return c, nil
	case <-pl.done:
		return nil, net.ErrClosed
	}
}

func (pl *pipeListener) Close() error {
	pl.once.Do(func() { close(pl.done) })
	return nil
}

func (pl *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "proxy-local" }
