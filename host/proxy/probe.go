package proxy

import (
	"context"
	"encoding/binary"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/internal/limits"
)

// The proxy's own calls on an upstream connection: the health Watch of
// its slot, ListKeys for the keyset comparison, and unary calls for the
// metrics scrape and health List. They use the lane like a relayed call
// does, with the proxy as the gRPC client.

const (
	healthWatchMethod = limits.HealthPrefix + "Watch"
	listKeysMethod    = "/nitrosign.v1.SignerService/ListKeys"
	// maxProbeMessage bounds a response message to one of the proxy's own
	// calls.
	maxProbeMessage = 4 << 20
)

// probe is one of the proxy's own calls on a lane.
type probe struct {
	id    uint32
	req   half
	onMsg func([]byte) // each response message, on the lane's reader

	buf  []byte // a response message not yet complete
	once sync.Once
	err  error // the call's status, nil for OK
	done chan struct{}
}

var _ upStream = (*probe)(nil)

// call makes a call on l: req is the request message; onMsg is given each
// response message (on the lane's reader: it must be quick). It returns
// the call's status as an error (nil: OK) when the call ends or ctx does.
func (l *lane) call(ctx context.Context, method string, req []byte, onMsg func([]byte)) error {
	p := &probe{onMsg: onMsg, done: make(chan struct{})}
	fields := []hpack.HeaderField{
		{Name: ":method", Value: "POST"},
		{Name: ":scheme", Value: "http"},
		{Name: ":path", Value: method},
		{Name: ":authority", Value: l.slot.up.authority},
		{Name: "content-type", Value: "application/grpc"},
		{Name: "te", Value: "trailers"},
		{Name: "user-agent", Value: "nitrosign-proxy"},
	}
	if d, ok := ctx.Deadline(); ok {
		fields = append(fields, hpack.HeaderField{Name: "grpc-timeout", Value: formatTimeout(time.Until(d))})
	}
	if err := l.open(p, fields, false); err != nil {
		return status.Error(codes.Unavailable, err.Error())
	}
	msg := make([]byte, 5+len(req))
	binary.BigEndian.PutUint32(msg[1:5], uint32(len(req)))
	copy(msg[5:], req)
	l.ep.mu.Lock()
	p.req.sendLocked(msg, true, nil)
	l.ep.mu.Unlock()
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		l.ep.mu.Lock()
		p.req.resetLocked(http2.ErrCodeCancel)
		l.ep.mu.Unlock()
		l.forget(p, p.id)
		p.end(status.FromContextError(ctx.Err()).Err())
		return p.err
	}
}

func (p *probe) attach(l *lane, id uint32) {
	p.id = id
	p.req = half{dst: l.ep, id: id, window: l.ep.initWin}
}

func (p *probe) reqHalf() *half { return &p.req }

func (p *probe) sink() *endpoint { return p.req.dst }

// end records the call's status once.
func (p *probe) end(err error) {
	p.once.Do(func() {
		p.err = err
		close(p.done)
	})
}

func (p *probe) finish(l *lane, err error) {
	l.forget(p, p.id)
	l.ep.mu.Lock()
	p.req.closed, p.req.over = true, true
	l.ep.mu.Unlock()
	p.end(err)
}

func (p *probe) onHeaders(l *lane, f *http2.MetaHeadersFrame) {
	if !f.StreamEnded() {
		return // response headers
	}
	code, msg := codes.Unknown, "no grpc-status in the trailers"
	if s := f.PseudoValue("status"); s != "" && s != "200" {
		code, msg = httpStatusCode(s), "HTTP status "+s
	}
	for _, hf := range f.RegularFields() {
		switch hf.Name {
		case "grpc-status":
			if n, err := strconv.Atoi(hf.Value); err == nil {
				code = codes.Code(n)
				if msg == "no grpc-status in the trailers" {
					msg = ""
				}
			}
		case "grpc-message":
			msg = hf.Value
		}
	}
	var err error
	if code != codes.OK {
		err = status.Error(code, msg)
	}
	p.finish(l, err)
}

func (p *probe) onData(l *lane, f *http2.DataFrame) {
	p.buf = append(p.buf, f.Data()...)
	for len(p.buf) >= 5 {
		n := binary.BigEndian.Uint32(p.buf[1:5])
		if n > maxProbeMessage || p.buf[0] != 0 {
			p.fail(l, status.Error(codes.ResourceExhausted, "upstream response too large or compressed"))
			return
		}
		if len(p.buf) < 5+int(n) {
			break
		}
		p.onMsg(p.buf[5 : 5+n])
		p.buf = p.buf[5+n:]
	}
	if len(p.buf) == 0 {
		p.buf = nil
	}
	l.ep.windowUpdate(p.id, f.Length)
	if f.StreamEnded() {
		p.finish(l, status.Error(codes.Internal, "upstream ended the stream without a status"))
	}
}

// fail cancels the call upstream with err.
func (p *probe) fail(l *lane, err error) {
	l.ep.mu.Lock()
	p.req.resetLocked(http2.ErrCodeCancel)
	l.ep.mu.Unlock()
	p.finish(l, err)
}

func (p *probe) onWindowOverflow(l *lane) {
	p.fail(l, status.Error(codes.Internal, "upstream flow-control error on the stream"))
}

func (p *probe) onReset(_ *lane, code http2.ErrCode) {
	p.end(status.Errorf(codeFromRST(code), "upstream reset the stream: %s", code))
}

func (p *probe) lost(_ *lane, reason string, _ bool) {
	p.end(status.Error(codes.Unavailable, reason))
}
