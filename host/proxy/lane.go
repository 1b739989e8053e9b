package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"

	"github.com/nitrosign/nitrosign/host/pool"
)

// A lane is one HTTP/2 connection to an upstream (the enclave, or the
// proxy's own health server) that carries relayed streams. A laneSet keeps
// a fixed number of them connected, redialling with backoff.

type lane struct {
	set *laneSet
	idx int
	fr  *http2.Framer // reads; set by connect, owned by serve
	ep  *endpoint

	mu         sync.Mutex // guards the fields below; taken after ep.mu when both are
	calls      map[uint32]*call
	nextID     uint32
	maxStreams uint32
	maxHeaders uint32 // the upstream's SETTINGS_MAX_HEADER_LIST_SIZE
	goAway     bool
	dead       bool
	// draining is closed when the lane takes no more calls (GOAWAY, or
	// its stream ids are used up): its slot dials a replacement at once.
	draining     chan struct{}
	drainingOnce sync.Once

	recvUnacked uint32 // owned by the reader
	lastRead    atomic.Int64
	pingAcked   atomic.Bool
}

// laneSet is a fixed number of lanes to one upstream.
type laneSet struct {
	name string
	dial func(context.Context) (net.Conn, error)
	// usable reports whether lane i may take calls (the pool's health
	// check of the same slot). nil: always.
	usable func(i int) bool
	// changed is called when a lane connects, drains or is lost.
	changed func()
	cfg     pool.Config
	log     *zap.Logger
	acct    *account // charged with what the lanes queue
	slots   []atomic.Pointer[lane]
	calls   []atomic.Uint64 // streams opened per slot
	dials   atomic.Uint64   // connections established, ever (replacements included)
	wake    []chan struct{} // cuts a slot's redial backoff short
	next    atomic.Uint64
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	mu   sync.Mutex
	live map[*lane]struct{} // every lane serving, draining ones included
}

func newLaneSet(name string, n int, dial func(context.Context) (net.Conn, error), usable func(int) bool, changed func(), cfg pool.Config, acct *account, log *zap.Logger) *laneSet {
	if changed == nil {
		changed = func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &laneSet{name: name, dial: dial, usable: usable, changed: changed, cfg: cfg, acct: acct, log: log,
		slots: make([]atomic.Pointer[lane], n), calls: make([]atomic.Uint64, n), wake: make([]chan struct{}, n),
		ctx: ctx, cancel: cancel, live: map[*lane]struct{}{}}
	for i := range n {
		s.wake[i] = make(chan struct{}, 1)
	}
	return s
}

// start begins connecting every slot (and redialling until close).
func (s *laneSet) start() {
	for i := range s.slots {
		s.wg.Add(1)
		go s.keep(i)
	}
}

// redialNow cuts the backoff of every slot that is not connected.
func (s *laneSet) redialNow() {
	for i := range s.slots {
		if s.slots[i].Load() == nil {
			select {
			case s.wake[i] <- struct{}{}:
			default:
			}
		}
	}
}

// close stops redialling and ends every lane; calls on them fail
// Unavailable.
func (s *laneSet) close() {
	s.cancel()
	s.mu.Lock()
	live := make([]*lane, 0, len(s.live))
	for l := range s.live {
		live = append(live, l)
	}
	s.mu.Unlock()
	for _, l := range live {
		l.ep.fail(errors.New("proxy stopped"))
	}
	s.wg.Wait()
}

// track adds (or removes) a serving lane.
func (s *laneSet) track(l *lane, add bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		s.live[l] = struct{}{}
	} else {
		delete(s.live, l)
	}
}

// keep keeps slot i connected until the set closes.
func (s *laneSet) keep(i int) {
	defer s.wg.Done()
	backoff := s.cfg.BackoffBase
	for s.ctx.Err() == nil {
		l, err := s.connect(i)
		if err != nil {
			if s.ctx.Err() != nil {
				return
			}
			s.log.Debug("upstream lane: connect failed", zap.String("upstream", s.name), zap.Int("lane", i), zap.Error(err))
			d := time.Duration(float64(backoff) * (1 + s.cfg.BackoffJitter*(2*rand.Float64()-1)))
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-s.wake[i]:
				// The upstream answers again (the pool's health check
				// of this slot is READY): dial now.
				t.Stop()
			case <-s.ctx.Done():
				t.Stop()
				return
			}
			backoff = min(time.Duration(float64(backoff)*s.cfg.BackoffMultiplier), s.cfg.BackoffMax)
			continue
		}
		backoff = s.cfg.BackoffBase
		s.dials.Add(1)
		s.track(l, true)
		s.slots[i].Store(l)
		if s.ctx.Err() != nil {
			l.ep.fail(errors.New("proxy stopped"))
		}
		s.changed()
		start := time.Now()
		served := make(chan error, 1)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			err := l.serve()
			s.slots[i].CompareAndSwap(l, nil)
			s.track(l, false)
			s.changed()
			served <- err
		}()
		select {
		case err = <-served:
			if s.ctx.Err() == nil {
				s.log.Debug("upstream lane lost", zap.String("upstream", s.name), zap.Int("lane", i), zap.Error(err))
			}
			if time.Since(start) < s.cfg.BackoffBase {
				// A connection that dies at once (a draining enclave) is
				// not redialled in a tight loop.
				select {
				case <-time.After(s.cfg.BackoffBase):
				case <-s.ctx.Done():
					return
				}
			}
		case <-l.draining:
			// The lane takes no new calls but finishes its own: its
			// replacement is dialled now, so one long call on a draining
			// connection never keeps the slot unusable.
			s.log.Debug("upstream lane draining: dialling its replacement", zap.String("upstream", s.name), zap.Int("lane", i))
		case <-s.ctx.Done():
			return
		}
	}
}

// connect dials and does the HTTP/2 handshake.
func (s *laneSet) connect(i int) (*lane, error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.ConnectTimeout)
	defer cancel()
	nc, err := s.dial(ctx)
	if err != nil {
		return nil, err
	}
	l := &lane{set: s, idx: i, ep: newEndpoint(nc, s.acct), calls: map[uint32]*call{}, nextID: 1, maxStreams: 100,
		maxHeaders: 1<<32 - 1, draining: make(chan struct{})}
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
	_ = nc.SetDeadline(time.Now().Add(s.cfg.ConnectTimeout))
	// Written while the server's SETTINGS are read: on an unbuffered
	// connection (the in-memory one) each side writes before it reads.
	hello := bytes.Clone(ep.buf.Bytes())
	ep.buf.Reset()
	wrote := make(chan error, 1)
	go func() {
		_, err := nc.Write(hello)
		wrote <- err
	}()
	br := bufio.NewReaderSize(readTracker{nc, &l.lastRead}, 32<<10)
	fr := http2.NewFramer(nil, br)
	fr.SetMaxReadFrameSize(maxFrameSize)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
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
	l.fr = fr
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

// drain marks the lane as taking no new calls (l.mu held).
func (l *lane) drainLocked() {
	l.goAway = true
	l.drainingOnce.Do(func() { close(l.draining) })
}

// eachReq visits the request half of every call on the lane (ep.mu held).
func (l *lane) eachReq(fn func(*half)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.calls {
		fn(&c.req)
	}
}

// lane.fr is set by connect and owned by serve.
func (l *lane) ready() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.dead && !l.goAway
}

func (l *lane) load() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.calls)
}

// lastLaneStreamID is the last stream id a lane uses before it is
// replaced (a variable so tests can reach it quickly).
var lastLaneStreamID uint32 = maxStreamID - 2

// errLaneFull: the lane has as many streams as the upstream allows.
var errLaneFull = errors.New("upstream connection has no free stream")

// open starts call c on the lane with the request headers fields.
func (l *lane) open(c *call, fields []hpack.HeaderField, end bool) error {
	exhausted, err := l.openLocked(c, fields, end)
	if exhausted {
		// Its stream ids are used up: it takes no more calls, closes when
		// the last one (this one at the latest) ends (forget), and is
		// redialled.
		l.set.log.Info("upstream connection used up its stream ids: draining it for a new one",
			zap.String("upstream", l.set.name), zap.Int("lane", l.idx))
		l.set.changed()
	}
	return err
}

// openLocked is open; exhausted reports that this call took the last
// stream id the lane may use.
func (l *lane) openLocked(c *call, fields []hpack.HeaderField, end bool) (exhausted bool, err error) {
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
	case uint32(len(l.calls)) >= l.maxStreams:
		l.mu.Unlock()
		return false, errLaneFull
	}
	id := l.nextID
	l.nextID += 2
	if l.nextID > lastLaneStreamID {
		l.drainLocked()
		exhausted = true
	}
	c.ln, c.uid = l, id
	c.req = half{dst: ep, id: id, window: ep.initWin, onSent: c.reqSent}
	l.calls[id] = c
	l.mu.Unlock()
	l.set.calls[l.idx].Add(1)
	ep.writeHeadersLocked(id, fields, end)
	if end {
		c.req.closed = true
	}
	return exhausted, nil
}

// forget removes c from the lane.
func (l *lane) forget(c *call) {
	l.mu.Lock()
	if l.calls[c.uid] == c {
		delete(l.calls, c.uid)
	}
	closeNow := l.goAway && len(l.calls) == 0
	l.mu.Unlock()
	if closeNow {
		l.ep.fail(errors.New("upstream GOAWAY: drained"))
	}
}

func (l *lane) lookup(id uint32) *call {
	l.mu.Lock()
	c := l.calls[id]
	l.mu.Unlock()
	return c
}

// serve reads the lane until it fails; then every call on it fails
// Unavailable. It returns why the lane ended.
func (l *lane) serve() (err error) {
	go l.ep.run(func(error) {})
	done := make(chan struct{})
	go l.keeper(done)
	defer func() {
		if v := recover(); v != nil {
			l.set.log.Error("panic relaying from upstream: lane closed", zap.Any("panic", v), zap.Stack("stack"))
			err = fmt.Errorf("panic: %v", v)
		}
		close(done)
		l.ep.fail(err)
		<-l.ep.done
		l.mu.Lock()
		l.dead = true
		calls := make([]*call, 0, len(l.calls))
		for _, c := range l.calls {
			calls = append(calls, c)
		}
		l.calls = map[uint32]*call{}
		l.mu.Unlock()
		msg := "upstream connection lost: " + rootMessage(err)
		for _, c := range calls {
			c.upstreamLost(msg)
		}
	}()
	for {
		f, err := l.fr.ReadFrame()
		if err != nil {
			return err
		}
		if err := l.handle(f); err != nil {
			return err
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
		if c := l.lookup(f.StreamID); c != nil {
			if f.Truncated {
				c.fail(codes.Internal, "upstream response headers too large")
				return nil
			}
			c.upHeaders(f)
		}
	case *http2.DataFrame:
		l.recvUnacked += f.Length
		if l.recvUnacked >= connWindow/4 {
			l.ep.windowUpdate(0, l.recvUnacked)
			l.recvUnacked = 0
		}
		c := l.lookup(f.StreamID)
		if c == nil {
			return nil
		}
		if c.respRecv.Add(-int64(f.Length)) < 0 {
			c.fail(codes.Internal, "upstream exceeded the stream's flow-control window")
			return nil
		}
		if pad := int(f.Length) - len(f.Data()); pad > 0 {
			c.respSent(pad, false)
		}
		c.upData(f.Data(), f.StreamEnded())
	case *http2.WindowUpdateFrame:
		var h *half
		if f.StreamID != 0 {
			c := l.lookup(f.StreamID)
			if c == nil {
				return nil
			}
			h = &c.req
		}
		err := l.ep.addWindow(h, f.Increment)
		var se http2.StreamError
		if errors.As(err, &se) {
			// One stream's window overflowed: that call fails, the
			// connection and its other calls go on.
			if c := l.lookup(se.StreamID); c != nil {
				c.cancelUpstreamCode(http2.ErrCodeFlowControl)
				c.answer(codes.Internal, "upstream flow-control error on the stream")
			}
			return nil
		}
		if err != nil {
			return err
		}
	case *http2.RSTStreamFrame:
		if c := l.lookup(f.StreamID); c != nil {
			c.upReset(f.ErrCode)
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

// onGoAway: the upstream is draining. Calls it did not take fail
// Unavailable (safe to retry); the others finish; then the lane closes
// and is redialled.
func (l *lane) onGoAway(f *http2.GoAwayFrame) {
	l.mu.Lock()
	l.drainLocked()
	var refused []*call
	for id, c := range l.calls {
		if id > f.LastStreamID {
			refused = append(refused, c)
			delete(l.calls, id)
		}
	}
	empty := len(l.calls) == 0
	l.mu.Unlock()
	l.set.changed()
	for _, c := range refused {
		l.ep.mu.Lock()
		c.req.closed, c.req.over = true, true
		c.req.dropQueue()
		l.ep.mu.Unlock()
		c.upstreamLost("upstream is shutting down (GOAWAY): call not started, retry")
	}
	if empty {
		l.ep.fail(errors.New("upstream GOAWAY"))
	}
}

// keeper pings an idle lane (pool.Config.KeepaliveTime) and closes it
// when the ping is not answered within KeepaliveTimeout.
func (l *lane) keeper(done <-chan struct{}) {
	kt, kto := l.set.cfg.KeepaliveTime, l.set.cfg.KeepaliveTimeout
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

// errUpstreamBusy: every ready lane is full (the upstream's
// SETTINGS_MAX_CONCURRENT_STREAMS) or congested (laneBusy).
var errUpstreamBusy = errors.New("enclave busy: every upstream connection is full or congested; retry with backoff")

// pick returns the least-loaded lane that can take a call (round-robin
// among equals): ready, below the upstream's stream limit and not
// congested.
func (s *laneSet) pick() (*lane, error) {
	n := len(s.slots)
	start := int(s.next.Add(1) % uint64(n))
	var best *lane
	bestLoad := int(^uint(0) >> 1)
	busy := false
	for i := range n {
		j := (start + i) % n
		l := s.slots[j].Load()
		if l == nil || (s.usable != nil && !s.usable(j)) {
			continue
		}
		l.mu.Lock()
		ok := !l.dead && !l.goAway
		ld, full := len(l.calls), uint32(len(l.calls)) >= l.maxStreams
		l.mu.Unlock()
		if !ok {
			continue
		}
		if full || l.ep.queued() > laneBusy {
			busy = true
			continue
		}
		if ld < bestLoad {
			best, bestLoad = l, ld
		}
	}
	switch {
	case best != nil:
		return best, nil
	case busy:
		return nil, errUpstreamBusy
	}
	return nil, fmt.Errorf("no ready upstream connection to %s: enclave down or not serving", s.name)
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
