package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/internal/limits"
	"github.com/nitrosign/nitrosign/internal/requestid"
)

// The life of one relayed call: opened by the client's reader, routed to
// a lane, relayed both ways, ended once (finish) by whichever side ends it.

// call is one relayed stream.
type call struct {
	px     *Proxy
	sc     *srvConn
	sid    uint32 // stream id on the client connection
	method string
	reqID  string
	start  time.Time
	slot   bool // holds an in-flight slot
	share  bool // counted in sc.upCalls

	// mu guards ln, uid, expired, cancelled and attempts: a call may be
	// relaunched (retry) while its client or its deadline ends it.
	mu        sync.Mutex
	ln        *lane  // nil until launched
	uid       uint32 // stream id on ln
	expired   bool   // the deadline fired: never launched after
	cancelled bool   // cancelled upstream: never relaunched after
	attempts  int

	req  half // toward the lane (dst: ln.ep)
	resp half // toward the client (dst: sc.ep)

	// Read by the client's reader only.
	reqEnded atomic.Bool // END_STREAM received from the client
	msg      msgLimit    // request message framing
	respMsg  msgLimit    // response message framing; the lane's reader only
	// fields are the upstream request headers, without grpc-timeout.
	fields []hpack.HeaderField
	// waiting: the call is not launched yet; its request is buffered in
	// pending until it is complete (see launchWhenComplete).
	waiting bool
	pendMu  sync.Mutex // guards pending and body: finish may run on a timer
	pending []byte
	// body is the complete request of a launched one-request call, kept
	// (and charged to the memory budget) until the response starts, to
	// relaunch it on another upstream connection if its own is lost or
	// refuses it.
	body []byte
	// The receive windows the proxy gives each sender on this stream:
	// the client (requests) and the enclave (responses).
	reqIn, respIn inflow

	headersSent bool // response headers went to the client; under sc.ep.mu

	deadline time.Time // zero: none; set before the call is shared
	dlIndex  int       // in sc.deadlines (-1: not there); under its mu
	finished atomic.Bool
	observed atomic.Bool
	code     atomic.Int32 // final status
	upErr    atomic.Bool  // the status is the upstream's failure (metrics)
}

var _ upStream = (*call)(nil)

// launchWhenComplete: a request smaller than this is buffered until it is
// complete (END_STREAM) before the call goes upstream; a larger one goes
// as soon as this much has arrived. Below the stream window, so a client
// never waits for credit to complete a buffered request.
const launchWhenComplete = streamWindow / 2

// maxHeldResponses bounds the response bytes the proxy holds for one
// client connection that does not read them before that connection gets
// no new call: a client granting no window, or not reading its socket,
// would otherwise make the enclave send, and the proxy keep, a response
// for every call it makes.
const maxHeldResponses = 4 << 20

// maxAttempts bounds how often a call is launched: the first time and a
// retry on another connection after each refusal or loss.
const maxAttempts = 3

// openCall takes a new stream. Calls whose request is one message (unary
// and server-streaming methods) wait in the proxy until the request is
// complete: a stream that is reset or never finished costs the enclave
// nothing. Client-streaming and unknown methods are launched at once. A
// malformed request is a strike against the connection; the error
// returned is the GOAWAY that ends it.
func (p *Proxy) openCall(sc *srvConn, f *http2.MetaHeadersFrame) error {
	c := &call{px: p, sc: sc, sid: f.StreamID, start: time.Now(), dlIndex: -1}
	c.reqIn.size, c.respIn.size = streamWindow, streamWindow
	c.reqIn.reset()
	c.respIn.reset()
	c.resp = half{dst: sc.ep, id: f.StreamID, onSent: c.respSent, acct: &sc.held}
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
		return nil
	case len(sc.calls) >= int(p.cfg.Limits.MaxConcurrentStreams):
		sc.mu.Unlock()
		sc.resetStream(c.sid, http2.ErrCodeRefusedStream)
		return nil
	}
	sc.calls[c.sid] = c
	sc.mu.Unlock()

	p.obs.CallStarted(c.method)
	fields, timeout, err := p.requestHeaders(c, f)
	if err != nil {
		if err.rst != 0 {
			c.code.Store(int32(codes.Internal))
			c.clientReset(err.rst)
			sc.resetStream(c.sid, err.rst)
		} else {
			c.answerHTTP(err.code, err.msg, err.http)
		}
		return sc.strike("too_many_malformed_requests")
	}
	c.fields = fields
	if timeout > 0 {
		c.deadline = c.start.Add(timeout)
		sc.deadlines.add(c)
	}
	if p.oneRequest[c.method] && !c.reqEnded.Load() {
		c.waiting = true
		return nil
	}
	c.launch()
	return nil
}

// launch routes the call to a lane and opens it there with what the
// client sent so far. Called by the client's reader.
func (c *call) launch() {
	p, sc := c.px, c.sc
	c.waiting = false
	c.pendMu.Lock()
	pending := c.pending
	c.pending = nil
	complete := c.reqEnded.Load() && p.oneRequest[c.method] && len(pending) > 0
	if complete {
		c.body = pending // stays charged until released
	}
	c.pendMu.Unlock()
	if !complete {
		p.mem.add(-int64(len(pending)))
	}
	if c.finished.Load() {
		return
	}
	if c.method == healthCheckMethod && c.reqEnded.Load() && c.answerHealth(pending) {
		return
	}
	if !limits.Exempt(c.method) {
		if err := p.inFlight.Acquire(); err != nil {
			c.answer(codes.ResourceExhausted, statusMessage(err))
			return
		}
		c.slot = true
	}
	if n := sc.upCalls.Add(1); int(n) > p.cfg.MaxConnectionCalls {
		sc.upCalls.Add(-1)
		p.shed(metrics.ShedConnectionShare)
		c.answer(codes.ResourceExhausted, fmt.Sprintf(
			"this connection has %d calls in flight at the enclave, its share is %d (--max-connection-calls); retry with backoff, or spread calls over connections",
			n-1, p.cfg.MaxConnectionCalls))
		return
	}
	c.share = true
	if held := sc.held.load(); held > maxHeldResponses {
		p.shed(metrics.ShedConnectionShare)
		c.answer(codes.ResourceExhausted, fmt.Sprintf(
			"%d KiB of responses to this connection wait for it to read them (its flow-control window or its socket); no new call until it reads", held>>10))
		return
	}
	if used := p.mem.load(); used > p.cfg.MemoryBudget {
		p.shed(metrics.ShedMemoryBudget)
		c.answer(codes.ResourceExhausted, fmt.Sprintf(
			"proxy busy: %d MiB buffered, over its memory budget of %d MiB (--memory-budget); retry with backoff",
			used>>20, p.cfg.MemoryBudget>>20))
		return
	}
	c.open(&sc.batch, p.routeSet(c.method, pending), avoid{}, pending, c.reqEnded.Load())
}

// open routes the call to a lane of set (not avoid) and starts it there
// with data (and the end of the request when end); b is the caller's
// reader's batch (nil: flush at once). It reports whether the call is
// open upstream; if not, it has been answered.
func (c *call) open(b *flushBatch, set *Upstreams, av avoid, data []byte, end bool) bool {
	p := c.px
	for {
		ln, err := p.route(b, set, av, c.deadline)
		if err != nil {
			if errors.Is(err, errUpstreamBusy) {
				p.shed(metrics.ShedUpstreamBusy)
				c.answer(codes.ResourceExhausted, err.Error())
				return false
			}
			p.obs.UpstreamError(metrics.ReasonNoReadyConnection)
			c.upErr.Store(true)
			c.answer(codes.Unavailable, err.Error())
			return false
		}
		fields := c.fields
		if !c.deadline.IsZero() {
			left := time.Until(c.deadline)
			if left <= 0 {
				c.answer(codes.DeadlineExceeded, "deadline exceeded (proxy)")
				return false
			}
			fields = append(fields[:len(fields):len(fields)], hpack.HeaderField{Name: "grpc-timeout", Value: formatTimeout(left), Sensitive: true})
		}
		if size, max := headerListSize(fields), ln.maxHeaderList(); size > max {
			c.answer(codes.ResourceExhausted, fmt.Sprintf(
				"request headers are %d bytes as forwarded, over the enclave's limit of %d (SETTINGS_MAX_HEADER_LIST_SIZE)", size, max))
			return false
		}
		opened, gone := false, false
		ln.ep.corked(b, func() {
			c.mu.Lock()
			if c.expired || c.cancelled || c.finished.Load() {
				c.mu.Unlock()
				gone = true
				return
			}
			err = ln.open(c, fields, end && len(data) == 0)
			if err != nil {
				c.mu.Unlock()
				return
			}
			c.attempts++
			opened = true
			// The first bytes go out under c.mu: a relaunch (the lane
			// lost at once) attaches the call to another lane under
			// c.mu too, so it waits for them instead of racing them.
			if len(data) > 0 {
				c.sendUpstream(ln, data, end)
			}
			c.mu.Unlock()
		})
		if opened || gone {
			return opened
		}
		// The connection picked went away (lost, draining, full) between
		// the pick and the open: the enclave never saw the call, so it
		// goes on another connection (the next pick passes this one by).
		if len(av.lanes) >= maxOpenTries {
			p.obs.UpstreamError(metrics.ReasonNoReadyConnection)
			c.upErr.Store(true)
			c.answer(codes.Unavailable, err.Error())
			return false
		}
		av.lanes = append(av.lanes, ln)
	}
}

// maxOpenTries bounds how many connections a call is opened on when each
// goes away between its pick and the open.
const maxOpenTries = 8

// attach is the call's stream id on l (upStream); under c.mu, l.ep.mu and
// l.mu.
func (c *call) attach(l *lane, id uint32) {
	c.ln, c.uid = l, id
	c.req = half{dst: l.ep, id: id, window: l.ep.initWin, onSent: c.reqSent, acct: &c.sc.acct}
	c.respIn.reset()
	c.respMsg = msgLimit{}
}

func (c *call) reqHalf() *half { return &c.req }

func (c *call) sink() *endpoint { return c.sc.ep }

// lane is the call's current lane and stream id on it (nil: none).
func (c *call) lane() (*lane, uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ln, c.uid
}

// relayRequest passes request bytes (and the end of the request) upstream,
// or buffers them while the call waits for its complete request. Called by
// the client's reader.
func (c *call) relayRequest(data []byte, end bool) {
	if err := c.msg.check(data, c.px.cfg.Limits.MaxRecvMsgSize); err != nil {
		if !c.finished.Load() {
			c.fail(codes.ResourceExhausted, err.Error())
		}
		return
	}
	if c.waiting {
		if len(data) > 0 {
			c.pendMu.Lock()
			c.pending = append(c.pending, data...)
			n := len(c.pending)
			c.pendMu.Unlock()
			c.px.mem.add(int64(len(data)))
			if n < launchWhenComplete && !end {
				return
			}
		}
		if end || len(data) > 0 {
			c.launch()
		}
		return
	}
	ln, _ := c.lane()
	if ln == nil || c.finished.Load() {
		// Answered by the proxy: the bytes are dropped, credit returned.
		c.credit(len(data))
		return
	}
	// Backpressure: while the upstream connection has more queued than
	// laneBusy, this client's reader waits here.
	b := &c.sc.batch
	if ln.ep.queued() > laneBusy {
		b.flush()
		if err := ln.ep.waitRoom(laneBusy, c.px.cfg.Limits.KeepaliveTimeout); err != nil {
			c.fail(codes.Unavailable, "upstream connection congested: "+err.Error())
			return
		}
	}
	ln.ep.corked(b, func() { c.sendUpstream(ln, data, end) })
}

// sendUpstream sends request bytes on the call's stream on ln.
func (c *call) sendUpstream(ln *lane, data []byte, end bool) {
	ep := ln.ep
	ep.mu.Lock()
	n, ended := c.req.sendLocked(data, end, nil)
	ep.mu.Unlock()
	if n > 0 || ended {
		c.reqSent(n, ended)
	}
}

// releaseBody forgets the request kept for a retry (the response began,
// or the call ended).
func (c *call) releaseBody() {
	c.pendMu.Lock()
	n := len(c.body)
	c.body = nil
	c.pendMu.Unlock()
	c.px.mem.add(-int64(n))
}

// healthCheckMethod is answered by the proxy itself for service "".
const healthCheckMethod = limits.HealthPrefix + "Check"

// answerHealth answers a Health/Check of the proxy itself (service "")
// from the proxy's state, without a stream on any connection: the proxy's
// health never depends on a stream limit or on the enclave. It reports
// false when the request is for another service (or compressed, or not
// one message), which is relayed.
func (c *call) answerHealth(req []byte) bool {
	svc, ok := healthService(req)
	if !ok || svc != "" {
		return false
	}
	st, _, _ := c.px.health.current()
	body, err := proto.Marshal(&healthpb.HealthCheckResponse{Status: st})
	if err != nil {
		return false
	}
	c.releaseBody()
	msg := make([]byte, 5+len(body))
	binary.BigEndian.PutUint32(msg[1:5], uint32(len(body)))
	copy(msg[5:], body)
	c.code.Store(int32(codes.OK))
	c.observe()
	ep := c.sc.ep
	ep.mu.Lock()
	wrote := ep.wrote // the proxy's own answer earns no pings
	ep.writeHeadersLocked(c.sid, []hpack.HeaderField{
		{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"},
	}, false)
	c.headersSent = true
	n, ended := c.resp.sendLocked(msg, true, []hpack.HeaderField{{Name: "grpc-status", Value: "0"}})
	ep.wrote = wrote
	ep.mu.Unlock()
	if n > 0 || ended {
		c.respSent(n, ended)
	}
	return true
}

// healthService is the service a Check or Watch request (one framed,
// uncompressed message) asks about.
func healthService(req []byte) (string, bool) {
	if len(req) < 5 || req[0] != 0 || int(binary.BigEndian.Uint32(req[1:5])) != len(req)-5 {
		return "", false
	}
	var in healthpb.HealthCheckRequest
	if err := proto.Unmarshal(req[5:], &in); err != nil {
		return "", false
	}
	return in.GetService(), true
}

// reqSent: n request bytes went upstream; return the credit to the client.
func (c *call) reqSent(n int, _ bool) { c.credit(n) }

// credit returns n bytes of stream credit to the client (batched).
func (c *call) credit(n int) {
	if n <= 0 || c.reqEnded.Load() {
		return
	}
	c.sc.ep.windowUpdate(c.sid, c.reqIn.give(n))
}

// respSent: n response bytes reached the client; return the credit
// upstream. ended: the response is complete and the call is over.
func (c *call) respSent(n int, ended bool) {
	if n > 0 && !ended {
		if ln, uid := c.lane(); ln != nil {
			ln.ep.windowUpdate(uid, c.respIn.give(n))
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
	c.resp.dropQueue()
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

// cancelUpstreamCode resets the upstream stream with code and forgets it;
// the call is never relaunched after.
func (c *call) cancelUpstreamCode(code http2.ErrCode) {
	c.mu.Lock()
	c.cancelled = true
	ln, uid := c.ln, c.uid
	c.mu.Unlock()
	if ln == nil {
		return
	}
	ep := ln.ep
	ep.mu.Lock()
	c.req.resetLocked(code)
	ep.mu.Unlock()
	ln.forget(c, uid)
}

// expire is the call's deadline. A call not launched yet never will be.
func (c *call) expire() {
	c.mu.Lock()
	c.expired = true
	c.mu.Unlock()
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
	c.resp.dropQueue()
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

// lost: the lane broke or refused the stream (upStream). A one-request
// call whose response has not begun is relaunched on another connection
// (of any upstream in rotation): refused streams never reached the
// enclave, and every method the proxy keeps requests for (unary and
// server-streaming) is safe to repeat. Otherwise it fails Unavailable.
func (c *call) lost(l *lane, reason string, refused bool) {
	if c.finished.Load() {
		return
	}
	if c.canRetry() {
		c.px.retries.Add(1)
		go c.relaunch(l, reason, refused)
		return
	}
	c.px.obs.UpstreamError(metrics.ReasonUnavailable)
	c.upErr.Store(true)
	c.answer(codes.Unavailable, reason)
}

// canRetry reports whether the call can be launched again.
func (c *call) canRetry() bool {
	c.pendMu.Lock()
	kept := c.body != nil
	c.pendMu.Unlock()
	if !kept {
		return false
	}
	c.sc.ep.mu.Lock()
	begun := c.headersSent
	c.sc.ep.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	return !begun && !c.cancelled && !c.expired && c.attempts < maxAttempts
}

// relaunch opens the call again on a connection other than failed.
func (c *call) relaunch(failed *lane, reason string, refused bool) {
	c.pendMu.Lock()
	body := c.body
	c.pendMu.Unlock()
	if body == nil || c.finished.Load() {
		return
	}
	if c.px.debug {
		c.px.log.Debug("call relaunched on another upstream connection", zap.String("method", c.method),
			zap.String("reason", reason), zap.Bool("refused", refused), zap.String(requestid.LogField, c.reqID))
	}
	// Another enclave first: the one that lost or refused the call is
	// likely going away as a whole.
	c.open(nil, c.px.routeSet(c.method, body), avoid{lanes: []*lane{failed}, up: failed.slot.up}, body, true)
}

// finish does the bookkeeping of a call that ended, once.
func (c *call) finish() {
	if !c.finished.CompareAndSwap(false, true) {
		return
	}
	if !c.deadline.IsZero() {
		c.sc.deadlines.remove(c)
	}
	ln, uid := c.lane()
	if ln != nil {
		ln.forget(c, uid)
	}
	c.pendMu.Lock()
	n := len(c.pending) + len(c.body)
	c.pending, c.body = nil, nil
	c.pendMu.Unlock()
	c.px.mem.add(-int64(n))
	sc := c.sc
	if c.share {
		sc.upCalls.Add(-1)
	}
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
	if ln, _ := c.lane(); !c.upErr.Load() && ln != nil && ln.slot.up.set == c.px.ups {
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

// onHeaders relays response headers or trailers (upStream).
func (c *call) onHeaders(l *lane, f *http2.MetaHeadersFrame) {
	if f.Truncated {
		c.fail(codes.Internal, "upstream response headers too large")
		return
	}
	c.releaseBody()
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
			ep.wrote = true
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
	c.upDone(l)
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
func (c *call) upDone(l *lane) {
	ep := l.ep
	ep.mu.Lock()
	c.req.closed, c.req.over = true, true
	c.req.dropQueue()
	ep.mu.Unlock()
	l.forget(c, c.req.id)
}

// onData relays response bytes (upStream).
func (c *call) onData(l *lane, f *http2.DataFrame) {
	if !c.respIn.take(f.Length) {
		c.fail(codes.Internal, "upstream exceeded the stream's flow-control window")
		return
	}
	if pad := int(f.Length) - len(f.Data()); pad > 0 {
		c.respSent(pad, false)
	}
	data, end := f.Data(), f.StreamEnded()
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
		c.upDone(l)
	}
	if n > 0 || ended {
		c.respSent(n, ended)
	}
}

// onWindowOverflow: the upstream overflowed the stream's send window.
func (c *call) onWindowOverflow(*lane) {
	c.cancelUpstreamCode(http2.ErrCodeFlowControl)
	c.answer(codes.Internal, "upstream flow-control error on the stream")
}

// onReset: upstream reset the stream (already forgotten by the lane).
func (c *call) onReset(l *lane, code http2.ErrCode) {
	ep := l.ep
	ep.mu.Lock()
	c.req.closed, c.req.over = true, true
	c.req.dropQueue()
	ep.mu.Unlock()
	if code == http2.ErrCodeRefusedStream {
		// The enclave did not take the stream: safe to retry.
		c.lost(l, "upstream refused the stream (REFUSED_STREAM)", true)
		return
	}
	st := codeFromRST(code)
	if code == http2.ErrCodeCancel && !c.deadline.IsZero() && !time.Now().Before(c.deadline) {
		// The enclave's copy of the deadline expired (grpc-go servers
		// reset with CANCEL then); the caller's deadline has too.
		c.answer(codes.DeadlineExceeded, "deadline exceeded")
		return
	}
	c.answer(st, fmt.Sprintf("upstream reset the stream: %s", code))
}
