package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/pool"
	"github.com/nitrosign/nitrosign/internal/target"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Upstreams is the set of enclaves the proxy forwards to (--upstream,
// repeated), each reached over Config.Pool.Size slots. A slot is one
// upstream connection and everything about it: it dials it and redials
// with backoff, watches the enclave's health over that same connection
// (grpc.health.v1.Health/Watch, service ""), replaces it at once when it
// drains, and counts what it did. A slot takes calls only while its
// connection is up and the enclave says SERVING.
//
// Every enclave must serve the same keyset, so that a Sign by key id is
// valid wherever it lands: each one's key ids are read (ListKeys) when a
// slot turns SERVING, and an enclave whose keyset differs from the one in
// rotation is taken out of rotation, with an error log line and the
// metric nitrosign_proxy_upstream_keyset_mismatch.
//
// Upstreams also implements grpc.ClientConnInterface for unary calls (the
// proxy's own: health List, the metrics scrape), carried over the slots.
type Upstreams struct {
	cfg pool.Config
	log *zap.Logger
	all []*upstream

	mem     *account // what the lanes queue; set by start
	started atomic.Bool
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	recheck chan struct{} // read every upstream's keyset now (buffered 1)

	mu        sync.Mutex
	live      map[*lane]struct{} // every lane serving, draining ones included
	reference string             // the keyset in rotation ("" none yet)
	subs      []func(int)
	lastReady int
	readyCh   chan struct{} // closed and replaced at every change of Ready
	closed    bool
}

// upstream is one enclave.
type upstream struct {
	set       *Upstreams
	name      string // its address, for logs and metrics
	authority string
	dial      func(context.Context) (net.Conn, error)
	slots     []*slot
	keepalive time.Duration
	health    bool // watch the health service (not the proxy's own server)
	keysets   bool // compare key ids with the other upstreams

	keyset   atomic.Pointer[string] // digest of its key ids, once read
	excluded atomic.Bool            // its keyset is not the one in rotation
}

// slot is one upstream connection; see Upstreams.
type slot struct {
	up   *upstream
	idx  int
	lane atomic.Pointer[lane]
	// health: the enclave said SERVING on the current lane; serving: the
	// slot takes calls (health, and the upstream's keyset compared).
	// mu orders their changes with the lane's: a late answer from a lane
	// being replaced must not overwrite what the new one said.
	mu      sync.Mutex
	health  atomic.Bool
	serving atomic.Bool
	state   atomic.Int32 // connectivity.State, for metrics

	calls      atomic.Uint64 // streams opened, ever
	dials      atomic.Uint64
	dialErrors atomic.Uint64
	readies    atomic.Uint64
}

// NewUpstreams prepares the connections to every target (Config.Upstreams
// with Config.Pool); nothing is dialled before the proxy built on it
// starts them. The proxy owns it from then on and closes it in Stop.
func NewUpstreams(cfg Config, log *zap.Logger) (*Upstreams, error) {
	targets, err := cfg.upstreams()
	if err != nil {
		return nil, err
	}
	if err := cfg.Pool.Validate(); err != nil {
		return nil, fmt.Errorf("pool config: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	u := newUpstreamSet(cfg.Pool, log.Named("upstream"))
	for _, t := range targets {
		u.add(t.String(), authorityOf(t), t.Dial, cfg.Pool.Size, cfg.Pool.KeepaliveTime, cfg.Pool.HealthCheck, true)
	}
	return u, nil
}

func newUpstreamSet(cfg pool.Config, log *zap.Logger) *Upstreams {
	ctx, cancel := context.WithCancel(context.Background())
	return &Upstreams{cfg: cfg, log: log, ctx: ctx, cancel: cancel, live: map[*lane]struct{}{}, readyCh: make(chan struct{}), recheck: make(chan struct{}, 1)}
}

func (u *Upstreams) add(name, authority string, dial func(context.Context) (net.Conn, error), n int, keepalive time.Duration, health, keysets bool) *upstream {
	up := &upstream{set: u, name: name, authority: authority, dial: dial, keepalive: keepalive, health: health, keysets: keysets}
	for i := range n {
		s := &slot{up: up, idx: i}
		s.state.Store(int32(connectivity.Idle))
		up.slots = append(up.slots, s)
	}
	u.all = append(u.all, up)
	return up
}

// authorityOf is the :authority the proxy's own calls carry.
func authorityOf(t target.Target) string {
	if t.Scheme == target.TCP {
		return t.HostPort
	}
	return fmt.Sprintf("vsock:%d:%d", t.CID, t.Port)
}

// start dials every slot, charging what the lanes queue to mem.
func (u *Upstreams) start(mem *account) {
	if !u.started.CompareAndSwap(false, true) {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return // nothing may run after Close
	}
	u.mem = mem
	for _, up := range u.all {
		for _, s := range up.slots {
			u.wg.Add(1)
			go s.keep()
		}
	}
	if len(u.all) > 1 {
		u.wg.Add(1)
		go u.refreshKeysets()
	}
}

// keysetRefresh is how often every upstream's key ids are read again: a
// rotation of a sealed keyset (KeyAdminService) changes them with no
// change of health, and every enclave takes the rotated keyset within
// its own refresh (30 s).
const keysetRefresh = 30 * time.Second

// refreshKeysets reads every serving upstream's key ids every
// keysetRefresh, and at once when an upstream was just taken out of
// rotation: the keysets on record for the others may be from before a
// rotation, and the one taken out may be the only one up to date.
func (u *Upstreams) refreshKeysets() {
	defer u.wg.Done()
	t := time.NewTicker(keysetRefresh)
	defer t.Stop()
	for {
		select {
		case <-u.ctx.Done():
			return
		case <-t.C:
		case <-u.recheck:
		}
		for _, up := range u.all {
			if l := up.servingLane(); up.keysets && l != nil {
				up.readKeyset(l)
			}
		}
	}
}

// servingLane is a lane on which the upstream said SERVING, or nil.
func (up *upstream) servingLane() *lane {
	for _, s := range up.slots {
		s.mu.Lock()
		l, ok := s.lane.Load(), s.health.Load()
		s.mu.Unlock()
		if ok && l != nil && l.ready() {
			return l
		}
	}
	return nil
}

// Close stops redialling and ends every connection; calls on them fail
// Unavailable. It is idempotent.
func (u *Upstreams) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil
	}
	u.closed = true
	u.cancel()
	live := make([]*lane, 0, len(u.live))
	for l := range u.live {
		live = append(live, l)
	}
	u.mu.Unlock()
	for _, l := range live {
		l.ep.fail(errors.New("proxy stopped"))
	}
	u.wg.Wait()
	u.changed()
	u.log.Info("upstream connections closed")
	return nil
}

func (u *Upstreams) track(l *lane, add bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if add {
		u.live[l] = struct{}{}
	} else {
		delete(u.live, l)
	}
}

// Targets are the upstream addresses, in --upstream order.
func (u *Upstreams) Targets() []string {
	out := make([]string, len(u.all))
	for i, up := range u.all {
		out[i] = up.name
	}
	return out
}

// Size is the number of slots, across upstreams.
func (u *Upstreams) Size() int {
	n := 0
	for _, up := range u.all {
		n += len(up.slots)
	}
	return n
}

// ready reports whether the slot takes calls.
func (s *slot) ready() bool {
	l := s.lane.Load()
	return l != nil && s.serving.Load() && !s.up.excluded.Load() && l.ready()
}

// Ready is the number of slots that take calls now.
func (u *Upstreams) Ready() int {
	u.mu.Lock()
	closed := u.closed
	u.mu.Unlock()
	if closed {
		return 0
	}
	n := 0
	for _, up := range u.all {
		for _, s := range up.slots {
			if s.ready() {
				n++
			}
		}
	}
	return n
}

// OnStateChange calls fn with Ready now and at every change of it.
func (u *Upstreams) OnStateChange(fn func(ready int)) {
	u.mu.Lock()
	u.subs = append(u.subs, fn)
	n := u.lastReady
	u.mu.Unlock()
	fn(n)
}

// WaitReady waits until a slot takes calls, or ctx ends.
func (u *Upstreams) WaitReady(ctx context.Context) error {
	for {
		u.mu.Lock()
		ch := u.readyCh
		u.mu.Unlock()
		if u.Ready() > 0 {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("no upstream connection ready: %w", ctx.Err())
		}
	}
}

// changed recomputes Ready and tells the subscribers when it changed.
func (u *Upstreams) changed() {
	n := u.Ready()
	u.mu.Lock()
	if n == u.lastReady {
		u.mu.Unlock()
		return
	}
	u.lastReady = n
	close(u.readyCh)
	u.readyCh = make(chan struct{})
	subs := slices.Clone(u.subs)
	u.mu.Unlock()
	for _, fn := range subs {
		fn(n)
	}
}

var _ metrics.Upstream = (*Upstreams)(nil)

// Stats returns a snapshot of every slot, upstream by upstream.
func (u *Upstreams) Stats() []metrics.SlotStats {
	var out []metrics.SlotStats
	for _, up := range u.all {
		for _, s := range up.slots {
			st := connectivity.State(s.state.Load())
			if st == connectivity.Ready && !s.ready() {
				st = connectivity.TransientFailure // up but not serving, or out of rotation
			}
			inflight := 0
			if l := s.lane.Load(); l != nil {
				inflight = l.load()
			}
			out = append(out, metrics.SlotStats{
				ConnStats: pool.ConnStats{Index: s.idx, State: st, InFlight: int64(inflight), Calls: s.calls.Load(),
					Readies: s.readies.Load(), Dials: s.dials.Load(), DialErrors: s.dialErrors.Load()},
				Upstream:       up.name,
				KeysetMismatch: up.excluded.Load(),
			})
		}
	}
	return out
}

// keep keeps the slot connected until the set closes.
func (s *slot) keep() {
	u := s.up.set
	defer u.wg.Done()
	backoff := u.cfg.BackoffBase
	for u.ctx.Err() == nil {
		s.state.Store(int32(connectivity.Connecting))
		s.dials.Add(1)
		l, err := dialLane(u.ctx, s)
		if err != nil {
			if u.ctx.Err() != nil {
				return
			}
			s.dialErrors.Add(1)
			s.state.Store(int32(connectivity.TransientFailure))
			u.log.Debug("connect failed", zap.String("upstream", s.up.name), zap.Int("slot", s.idx), zap.Error(err))
			d := time.Duration(float64(backoff) * (1 + u.cfg.BackoffJitter*(2*rand.Float64()-1)))
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-u.ctx.Done():
				t.Stop()
				return
			}
			backoff = min(time.Duration(float64(backoff)*u.cfg.BackoffMultiplier), u.cfg.BackoffMax)
			continue
		}
		backoff = u.cfg.BackoffBase
		u.track(l, true)
		s.mu.Lock()
		s.health.Store(false)
		s.serving.Store(false)
		s.lane.Store(l)
		s.mu.Unlock()
		s.state.Store(int32(connectivity.Ready))
		s.readies.Add(1)
		if u.ctx.Err() != nil {
			l.ep.fail(errors.New("proxy stopped"))
		}
		u.changed()
		start := time.Now()
		served := make(chan error, 1)
		u.wg.Add(1)
		go func() {
			defer u.wg.Done()
			err := l.serve()
			s.mu.Lock()
			if s.lane.CompareAndSwap(l, nil) {
				s.health.Store(false)
				s.serving.Store(false)
				s.state.Store(int32(connectivity.TransientFailure))
			}
			s.mu.Unlock()
			u.track(l, false)
			s.up.forgetKeysetWhenDown()
			u.changed()
			served <- err
		}()
		if s.up.health {
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				s.watchHealth(l)
			}()
		} else {
			s.setServing(l, true)
		}
		lost := false
		select {
		case err = <-served:
			lost = true
		case <-l.draining:
			l.mu.Lock()
			dead := l.dead
			l.mu.Unlock()
			if dead {
				err, lost = <-served, true
			} else {
				// The connection takes no new calls but finishes its own:
				// its replacement is dialled now, so one long call on a
				// draining connection never keeps the slot unusable.
				u.log.Debug("upstream connection draining: dialling its replacement", zap.String("upstream", s.up.name), zap.Int("slot", s.idx))
			}
		case <-u.ctx.Done():
			return
		}
		if lost {
			if u.ctx.Err() == nil {
				u.log.Info("upstream connection lost", zap.String("upstream", s.up.name), zap.Int("slot", s.idx), zap.String("reason", rootMessage(err)))
			}
			if time.Since(start) < u.cfg.BackoffBase {
				// A connection that dies at once (a draining enclave) is
				// not redialled in a tight loop.
				select {
				case <-time.After(u.cfg.BackoffBase):
				case <-u.ctx.Done():
					return
				}
			}
		}
	}
}

// forgetKeysetWhenDown forgets the upstream's keyset once none of its
// slots is connected (it may come back with another), and compares the
// others again: a keyset is in rotation only while an upstream serves it.
func (up *upstream) forgetKeysetWhenDown() {
	if !up.keysets {
		return
	}
	for _, s := range up.slots {
		if s.lane.Load() != nil {
			return
		}
	}
	if up.keyset.Swap(nil) != nil {
		up.set.compareKeysets()
	}
}

// healthRetry is how long a slot waits before watching the enclave's
// health again after a Watch ended on a connection that is still up.
const healthRetry = time.Second

// watchHealth follows the enclave's health (service "") over l until l
// ends; the slot serves while the enclave says SERVING. An enclave
// without the health service counts as serving (grpc-go's rule).
func (s *slot) watchHealth(l *lane) {
	u := s.up.set
	req, _ := proto.Marshal(&healthpb.HealthCheckRequest{})
	for {
		ctx, cancel := context.WithCancel(u.ctx)
		go func() {
			select {
			case <-l.draining:
			case <-ctx.Done():
			}
			cancel()
		}()
		err := l.call(ctx, healthWatchMethod, req, func(msg []byte) {
			var resp healthpb.HealthCheckResponse
			if proto.Unmarshal(msg, &resp) != nil {
				return
			}
			s.setServing(l, resp.GetStatus() == healthpb.HealthCheckResponse_SERVING)
		})
		cancel()
		if status.Code(err) == codes.Unimplemented {
			s.setServing(l, true)
			return
		}
		s.setServing(l, false)
		select {
		case <-l.draining:
			return
		case <-u.ctx.Done():
			return
		case <-time.After(healthRetry):
		}
	}
}

// setServing records the enclave's health on lane l (if l is still the
// slot's). On SERVING the slot takes calls once the upstream's keyset has
// been read on l and compared with the others (so that no call lands on
// an enclave with another keyset in between).
func (s *slot) setServing(l *lane, healthy bool) {
	s.mu.Lock()
	if s.lane.Load() != l || s.health.Load() == healthy {
		s.mu.Unlock()
		return
	}
	s.health.Store(healthy)
	now := !healthy || !s.up.keysets
	if now {
		s.serving.Store(healthy)
	}
	s.mu.Unlock()
	u := s.up.set
	u.log.Info("upstream health", zap.String("upstream", s.up.name), zap.Int("slot", s.idx), zap.Bool("serving", healthy))
	if now {
		u.changed()
		return
	}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		s.up.readKeyset(l)
		s.mu.Lock()
		ok := s.lane.Load() == l && s.health.Load()
		if ok {
			s.serving.Store(true)
		}
		s.mu.Unlock()
		if ok {
			u.changed()
		}
	}()
}

// readKeyset reads the enclave's key ids over l and compares them with
// the keyset in rotation.
func (up *upstream) readKeyset(l *lane) {
	u := up.set
	ctx, cancel := context.WithTimeout(u.ctx, 10*time.Second)
	defer cancel()
	req, _ := proto.Marshal(&pb.ListKeysRequest{})
	var resp pb.ListKeysResponse
	var decodeErr error
	err := l.call(ctx, listKeysMethod, req, func(msg []byte) { decodeErr = proto.Unmarshal(msg, &resp) })
	if err == nil {
		err = decodeErr
	}
	if err != nil {
		if u.ctx.Err() == nil {
			u.log.Warn("could not read the upstream's key ids (ListKeys); keyset not compared", zap.String("upstream", up.name), zap.Error(err))
		}
		return
	}
	ids := make([]string, 0, len(resp.GetKeys()))
	for _, k := range resp.GetKeys() {
		ids = append(ids, k.GetKeyId())
	}
	slices.Sort(ids)
	h := sha256.New()
	for _, id := range ids {
		h.Write([]byte(id))
		h.Write([]byte{0})
	}
	digest := hex.EncodeToString(h.Sum(nil))
	up.keyset.Store(&digest)
	u.compareKeysets()
}

// compareKeysets keeps every upstream whose keyset is the one in rotation
// and takes the others out. The keyset in rotation stays while any
// upstream serves it; otherwise it is the one most upstreams serve (the
// first in --upstream order on a tie).
func (u *Upstreams) compareKeysets() {
	u.mu.Lock()
	count := map[string]int{}
	var order []string
	for _, up := range u.all {
		if k := up.keyset.Load(); k != nil {
			if count[*k] == 0 {
				order = append(order, *k)
			}
			count[*k]++
		}
	}
	if count[u.reference] == 0 {
		best := ""
		for _, k := range order {
			if count[k] > count[best] {
				best = k
			}
		}
		u.reference = best
	}
	ref := u.reference
	u.mu.Unlock()
	for _, up := range u.all {
		k := up.keyset.Load()
		out := k != nil && *k != ref
		if up.excluded.Swap(out) == out {
			continue
		}
		if out {
			select {
			case u.recheck <- struct{}{}:
			default:
			}
			u.log.Error("upstream serves a different keyset from the other upstreams: taken out of rotation "+
				"(a Sign by key id must be valid on every upstream; give every enclave the same sealed keyset)",
				zap.String("upstream", up.name), zap.String("keyset", (*k)[:16]), zap.String("in_rotation", ref[:min(16, len(ref))]))
		} else {
			u.log.Info("upstream keyset matches again: back in rotation", zap.String("upstream", up.name))
		}
	}
	u.changed()
}

// errUpstreamBusy: every ready connection is full (the upstream's
// SETTINGS_MAX_CONCURRENT_STREAMS) or congested (laneBusy).
var errUpstreamBusy = errors.New("enclave busy: every upstream connection is full or congested; retry with backoff")

// avoid is what a retry passes over: the connections that failed it, and
// preferably the whole upstream whose connection was lost or refused it
// (its other connections are likely going too).
type avoid struct {
	lanes []*lane
	up    *upstream
}

func (a avoid) has(l *lane) bool {
	for _, x := range a.lanes {
		if x == l {
			return true
		}
	}
	return false
}

// pick returns the least-loaded lane that can take a call, across every
// upstream in rotation (round-robin among equals): ready, below the
// upstream's stream limit and not congested, and not in av (av.up only
// while another upstream can take it).
func (u *Upstreams) pick(av avoid) (*lane, error) {
	l, err := u.pickFrom(nil, av)
	if l == nil && av.up != nil && !errors.Is(err, errUpstreamBusy) {
		av.up = nil
		return u.pickFrom(nil, av)
	}
	return l, err
}

// pickFrom is pick among the slots of only (nil: every upstream).
func (u *Upstreams) pickFrom(only *upstream, av avoid) (*lane, error) {
	var best *lane
	bestLoad := int(^uint(0) >> 1)
	busy := false
	n := 0
	for _, up := range u.all {
		n += len(up.slots)
	}
	start := rand.IntN(max(n, 1))
	for k := range n {
		s := u.slotAt((start + k) % n)
		l := s.lane.Load()
		if l == nil || (only != nil && s.up != only) || s.up == av.up || av.has(l) ||
			!s.serving.Load() || s.up.excluded.Load() {
			continue
		}
		l.mu.Lock()
		ok := !l.dead && !l.goAway
		ld, full := len(l.streams), uint32(len(l.streams)) >= l.maxStreams
		l.mu.Unlock()
		if !ok {
			continue
		}
		queued, failed := l.ep.status()
		if failed {
			continue // its reader has not seen it end yet
		}
		if full || queued > laneBusy {
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
	names := u.Targets()
	if len(names) == 1 {
		return nil, fmt.Errorf("no ready upstream connection to %s: enclave down or not serving", names[0])
	}
	return nil, fmt.Errorf("no ready upstream connection to any of %v: enclaves down, not serving or out of rotation", names)
}

// slotAt is the i-th slot across upstreams.
func (u *Upstreams) slotAt(i int) *slot {
	for _, up := range u.all {
		if i < len(up.slots) {
			return up.slots[i]
		}
		i -= len(up.slots)
	}
	return nil
}

var _ grpc.ClientConnInterface = (*Upstreams)(nil)

// Invoke makes a unary call on a ready upstream connection (the proxy's
// own calls: health List, the metrics scrape). opts are ignored.
func (u *Upstreams) Invoke(ctx context.Context, method string, args, reply any, _ ...grpc.CallOption) error {
	in, ok := args.(proto.Message)
	out, ok2 := reply.(proto.Message)
	if !ok || !ok2 {
		return status.Error(codes.Internal, "proxy: Invoke takes protobuf messages")
	}
	req, err := proto.Marshal(in)
	if err != nil {
		return status.Errorf(codes.Internal, "proxy: marshal %s request: %v", method, err)
	}
	// The first upstream (in --upstream order) that can take it, so that
	// the enclave's metrics, scraped this way, come from one enclave
	// while it serves, not from whichever a scrape happens to reach.
	var l *lane
	err = errors.New("no upstream")
	for _, up := range u.all {
		if l, err = u.pickFrom(up, avoid{}); l != nil {
			break
		}
	}
	if l == nil {
		return status.Error(codes.Unavailable, err.Error())
	}
	var decodeErr error
	got := false
	err = l.call(ctx, method, req, func(msg []byte) {
		got = true
		decodeErr = proto.Unmarshal(msg, out)
	})
	switch {
	case err != nil:
		return err
	case decodeErr != nil:
		return status.Errorf(codes.Internal, "proxy: unmarshal %s response: %v", method, decodeErr)
	case !got:
		return status.Errorf(codes.Internal, "proxy: %s: no response message", method)
	}
	return nil
}

// NewStream is not offered: the proxy's own calls are unary.
func (u *Upstreams) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	return nil, status.Error(codes.Unimplemented, "proxy: streams on the upstream set are not supported")
}
