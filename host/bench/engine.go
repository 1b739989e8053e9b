package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Conn is one client connection that calls are made on. Call must be safe
// for concurrent use: several workers share a long-lived connection.
type Conn interface {
	// Call makes one call and returns its error (a gRPC status error for
	// an RPC failure).
	Call(ctx context.Context) error
	// Close releases the connection.
	Close() error
}

// Connector is implemented by a Conn that connects lazily. Run connects
// long-lived connections before the clock starts, so the first calls do not
// pay for it; a connection opened by ConnectEvery is not connected ahead:
// its first call pays, as a short-lived client's does.
type Connector interface {
	Connect(ctx context.Context) error
}

// Dialer opens a Conn. It should not block on the network: Run calls
// Connect when it wants a connection established.
type Dialer func(ctx context.Context) (Conn, error)

// Options describe a run for its report and where its progress goes.
type Options struct {
	// Name labels the target in reports ("direct", "proxy"). Default: Target.
	Name string
	// Target is the address, for reports.
	Target string
	// Workload describes the calls, for reports ("echo, 32 B payload").
	Workload string
	// Progress receives a live progress line, rewritten in place about
	// once a second (use it only for a terminal). nil: no progress.
	Progress io.Writer
	// WatchPIDs are processes (e.g. the server under test) whose resident
	// memory is sampled during the run and reported (Linux only).
	WatchPIDs []int
	// Round is the round number shown in the progress line of a Compare.
	Round string
}

// ErrorCount is how many calls failed with one status code.
type ErrorCount struct {
	// Code is the gRPC status code name ("Unavailable").
	Code string `json:"code"`
	// Count is the number of measured calls that failed with it.
	Count int64 `json:"count"`
	// Example is the message of the first such failure.
	Example string `json:"example"`
}

// shard is the recording state of a group of workers. Workers lock it only
// to record a call, so with a few workers per shard contention stays low
// while memory stays bounded (a histogram is ~200 KiB).
type shard struct {
	mu          sync.Mutex
	latency     *hdrhistogram.Histogram // from the intended send time (= actual, closed loop)
	uncorrected *hdrhistogram.Histogram // from the actual send time; open loop only
	successes   int64
	errs        map[codes.Code]*ErrorCount
	errCount    int64
	lastEnd     time.Time
	connsOpened int64
	done        int64 // every completed call, warm-up included: for the progress line
	failed      int64 // every failed call, warm-up included
	_           [64]byte
}

func newShard(openLoop bool) *shard {
	s := &shard{latency: newHistogram(), errs: map[codes.Code]*ErrorCount{}}
	if openLoop {
		s.uncorrected = newHistogram()
	}
	return s
}

// record notes one completed call.
func (s *shard) record(measured bool, intended, start, end time.Time, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done++
	if err != nil {
		s.failed++
	}
	if !measured {
		return
	}
	if end.After(s.lastEnd) {
		s.lastEnd = end
	}
	if err != nil {
		s.errCount++
		st := status.Convert(err)
		e := s.errs[st.Code()]
		if e == nil {
			e = &ErrorCount{Code: st.Code().String(), Example: st.Message()}
			s.errs[st.Code()] = e
		}
		e.Count++
		return
	}
	s.successes++
	record(s.latency, end.Sub(intended))
	if s.uncorrected != nil {
		record(s.uncorrected, end.Sub(start))
	}
}

// run is the state of one Run.
type run struct {
	cfg    Config
	opt    Options
	ctx    context.Context
	dial   Dialer
	conns  []Conn // long-lived; nil with ConnectEvery
	shards []*shard

	t0, measureStart, end time.Time // end: closed loop with Duration only
	hardStop              time.Time // open loop: no call is sent after it

	// Open loop: ticket i is scheduled at t0 + i*interval; tickets below
	// warmTickets are warm-up, the run has totalTickets.
	ticket       atomic.Int64
	warmTickets  int64
	totalTickets int64

	issued atomic.Int64 // closed loop with Requests: measured calls started
}

// Run drives one target with cfg's load and returns what it measured. It
// returns an error only when the run could not be made (invalid cfg, a
// long-lived connection that could not be established); failed calls are
// counted in the Result. When ctx ends early the calls made so far are
// reported, with Interrupted set.
func Run(ctx context.Context, cfg Config, dial Dialer, opt Options) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("bench config: %w", err)
	}
	if dial == nil {
		return nil, errors.New("bench: nil dialer")
	}
	if opt.Name == "" {
		opt.Name = opt.Target
	}
	r := &run{cfg: cfg, opt: opt, ctx: ctx, dial: dial}
	if cfg.ConnectEvery == 0 {
		if err := r.connect(); err != nil {
			return nil, err
		}
	}
	defer r.closeConns()

	nShards := min(cfg.Concurrency, 4*runtime.GOMAXPROCS(0))
	for range nShards {
		r.shards = append(r.shards, newShard(cfg.OpenLoop()))
	}

	r.t0 = time.Now()
	r.measureStart = r.t0.Add(cfg.Warmup)
	if cfg.OpenLoop() {
		r.warmTickets = int64(math.Round(cfg.Warmup.Seconds() * cfg.Rate))
		measured := cfg.Requests
		if measured == 0 {
			measured = max(1, int64(math.Round(cfg.Duration.Seconds()*cfg.Rate)))
		}
		r.totalTickets = r.warmTickets + measured
		planned := time.Duration(float64(r.totalTickets) * float64(time.Second) / cfg.Rate)
		// A target that cannot keep up gets a grace period to catch up,
		// then the calls it never received are reported as not sent.
		grace := max(time.Second, planned/10)
		r.hardStop = r.t0.Add(planned + grace)
	} else if cfg.Duration > 0 {
		r.end = r.measureStart.Add(cfg.Duration)
	}

	watch := startWatch(opt.WatchPIDs)
	stopProgress := r.startProgress()
	var wg sync.WaitGroup
	for i := range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.worker(i)
		}()
	}
	wg.Wait()
	stopProgress()
	var calls int64
	for _, s := range r.shards {
		s.mu.Lock()
		calls += s.done
		s.mu.Unlock()
	}
	procs := watch.stop(calls)

	res := r.result()
	res.Processes = procs
	res.Interrupted = ctx.Err() != nil
	return res, nil
}

// connect dials and connects the long-lived connections, all before the
// clock starts.
func (r *run) connect() error {
	for i := range r.cfg.Connections {
		c, err := r.dial(r.ctx)
		if err != nil {
			r.closeConns()
			return fmt.Errorf("connection %d to %s: %w", i, r.opt.Target, err)
		}
		r.conns = append(r.conns, c)
	}
	// Connect in parallel: a thousand connections one by one would take a
	// while on a busy machine.
	errs := make([]error, len(r.conns))
	var wg sync.WaitGroup
	for i, c := range r.conns {
		cn, ok := c.(Connector)
		if !ok {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(r.ctx, r.cfg.CallTimeout)
			defer cancel()
			if err := cn.Connect(ctx); err != nil {
				errs[i] = fmt.Errorf("connection %d to %s: %w", i, r.opt.Target, err)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		r.closeConns()
		return err
	}
	return nil
}

func (r *run) closeConns() {
	for _, c := range r.conns {
		_ = c.Close()
	}
	r.conns = nil
}

// workerConn is a worker's current connection.
type workerConn struct {
	conn  Conn
	calls int
}

// next returns the connection for the worker's next call: a shared
// long-lived one, or its own, replaced every ConnectEvery calls.
func (r *run) next(id int, wc *workerConn, sh *shard, measured bool) (Conn, error) {
	if r.cfg.ConnectEvery == 0 {
		return r.conns[id%len(r.conns)], nil
	}
	if wc.conn != nil && wc.calls < r.cfg.ConnectEvery {
		wc.calls++
		return wc.conn, nil
	}
	if wc.conn != nil {
		_ = wc.conn.Close()
		wc.conn = nil
	}
	c, err := r.dial(r.ctx)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "dial %s: %v", r.opt.Target, err)
	}
	wc.conn, wc.calls = c, 1
	if measured {
		sh.mu.Lock()
		sh.connsOpened++
		sh.mu.Unlock()
	}
	return c, nil
}

func (r *run) call(c Conn) error {
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.CallTimeout)
	defer cancel()
	return c.Call(ctx)
}

func (r *run) worker(id int) {
	sh := r.shards[id%len(r.shards)]
	var wc workerConn
	defer func() {
		if wc.conn != nil {
			_ = wc.conn.Close()
		}
	}()
	if r.cfg.OpenLoop() {
		r.openLoop(id, sh, &wc)
	} else {
		r.closedLoop(id, sh, &wc)
	}
}

func (r *run) closedLoop(id int, sh *shard, wc *workerConn) {
	for r.ctx.Err() == nil {
		now := time.Now()
		measured := !now.Before(r.measureStart)
		if measured {
			if r.cfg.Requests > 0 {
				if r.issued.Add(1) > r.cfg.Requests {
					return
				}
			} else if !now.Before(r.end) {
				return
			}
		}
		c, err := r.next(id, wc, sh, measured)
		start := time.Now()
		if err == nil {
			err = r.call(c)
		}
		end := time.Now()
		if err != nil && r.ctx.Err() != nil {
			return // interrupted: the call was cut by us, not failed by the target
		}
		sh.record(measured, start, start, end, err)
	}
}

func (r *run) openLoop(id int, sh *shard, wc *workerConn) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for r.ctx.Err() == nil {
		i := r.ticket.Add(1) - 1
		if i >= r.totalTickets {
			return
		}
		intended := r.t0.Add(time.Duration(float64(i) * float64(time.Second) / r.cfg.Rate))
		now := time.Now()
		if now.After(r.hardStop) {
			return
		}
		if d := intended.Sub(now); d > 0 {
			timer.Reset(d)
			select {
			case <-timer.C:
			case <-r.ctx.Done():
				return
			}
		}
		measured := i >= r.warmTickets
		c, err := r.next(id, wc, sh, measured)
		start := time.Now()
		if err == nil {
			err = r.call(c)
		}
		end := time.Now()
		if err != nil && r.ctx.Err() != nil {
			return // interrupted: the call was cut by us, not failed by the target
		}
		sh.record(measured, intended, start, end, err)
	}
}

// result merges the shards.
func (r *run) result() *Result {
	res := &Result{
		Name:     r.opt.Name,
		Target:   r.opt.Target,
		Workload: r.opt.Workload,
		Load:     r.cfg.Shape(),
		Config:   reportConfig(r.cfg),
		Start:    r.measureStart,
		hist:     newHistogram(),
	}
	if r.cfg.OpenLoop() {
		res.uncorrected = newHistogram()
	}
	errs := map[string]*ErrorCount{}
	var lastEnd time.Time
	for _, s := range r.shards {
		s.mu.Lock()
		res.hist.Merge(s.latency)
		if s.uncorrected != nil {
			res.uncorrected.Merge(s.uncorrected)
		}
		res.Successes += s.successes
		res.Requests += s.successes + s.errCount
		res.ConnectionsOpened += s.connsOpened
		for _, e := range s.errs {
			mergeError(errs, *e)
		}
		if s.lastEnd.After(lastEnd) {
			lastEnd = s.lastEnd
		}
		s.mu.Unlock()
	}
	res.Errors = sortedErrors(errs)
	if r.cfg.ConnectEvery == 0 {
		res.ConnectionsOpened = int64(r.cfg.Connections)
	}
	if r.cfg.OpenLoop() {
		res.NotSent = max(0, r.totalTickets-r.warmTickets-res.Requests)
		if r.ctx.Err() != nil {
			res.NotSent = 0 // interrupted: nothing was missed by the target
		}
	}
	if lastEnd.After(r.measureStart) {
		res.Elapsed = lastEnd.Sub(r.measureStart)
	}
	res.finish()
	return res
}
