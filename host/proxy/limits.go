package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/internal/limits"
	// The nitrosign services' descriptors tell unary methods from streams
	// (unaryMethods); the health and reflection ones come with grpc.
	_ "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// ShedObserver is told about load the proxy sheds: a client connection
// beyond MaxConnections (metrics.ShedMaxConnections) or a call beyond
// MaxInFlight (metrics.ShedMaxInFlight). An Observer that also implements
// it (*metrics.Metrics) is told.
type ShedObserver interface {
	Shed(reason string)
}

var _ ShedObserver = (*metrics.Metrics)(nil)

// validateLimits reports every invalid limit field.
func (c Config) validateLimits() []error {
	errs := []error{c.Limits.Validate()}
	positive := func(name string, v int64) {
		if v < 1 {
			errs = append(errs, fmt.Errorf("%s %d: must be >= 1", name, v))
		}
	}
	positive("max calls per connection", int64(c.MaxConnectionCalls))
	positive("max client resets", int64(c.MaxClientResets))
	if c.MaxConnectionBuffer < 64<<10 {
		errs = append(errs, fmt.Errorf("max connection buffer %d bytes: must be >= 65536 (a few frames)", c.MaxConnectionBuffer))
	}
	if c.MemoryBudget < int64(c.MaxConnectionBuffer) {
		errs = append(errs, fmt.Errorf("memory budget %d bytes: must be >= the max connection buffer %d", c.MemoryBudget, c.MaxConnectionBuffer))
	}
	if c.DefaultStreamTimeout < 0 {
		errs = append(errs, fmt.Errorf("default stream timeout %v: must not be negative", c.DefaultStreamTimeout))
	}
	return errs
}

// newInFlight is the bound on calls served at once (health calls exempt):
// one beyond it is answered ResourceExhausted at once, logged at most once
// a second and counted in nitrosign_proxy_shed_total.
func newInFlight(c Config, log *zap.Logger, obs Observer) *limits.InFlight {
	shed, _ := obs.(ShedObserver)
	th := limits.NewThrottle(time.Second)
	var l *limits.InFlight
	l = limits.NewInFlight("proxy", c.Limits.MaxInFlight, func() {
		if shed != nil {
			shed.Shed(metrics.ShedMaxInFlight)
		}
		if ok, more := th.Allow(); ok {
			log.Warn("shedding load: calls refused with ResourceExhausted (--max-in-flight)",
				zap.Int64("limit", l.Limit()), zap.Uint64("refused_since_last_line", more+1),
				zap.Uint64("refused_total", l.Shed()))
		}
	})
	return l
}

// unaryMethods lists, as "/package.Service/Method", every unary method of
// every service linked into the binary (nitrosign's, health, reflection).
func unaryMethods() map[string]bool {
	return methods(func(md protoreflect.MethodDescriptor) bool { return !md.IsStreamingClient() && !md.IsStreamingServer() })
}

// oneRequestMethods lists every method whose client sends one message
// (unary and server-streaming): the proxy launches those only once their
// request is complete.
func oneRequestMethods() map[string]bool {
	return methods(func(md protoreflect.MethodDescriptor) bool { return !md.IsStreamingClient() })
}

// TLSObserver is told about every client TLS handshake the proxy refused;
// *metrics.Metrics implements it.
type TLSObserver interface {
	TLSHandshakeFailed(reason string)
}

var _ TLSObserver = (*metrics.Metrics)(nil)

// tlsRefused counts a refused client handshake by reason and logs it at
// info, at most once a second (a scanner or a misconfigured client must
// not flood the journal): operators see a bad renewal or a client with
// the wrong certificate without debug logging.
func (p *Proxy) tlsRefused(peer net.Addr, err error) {
	reason := tlsFailureReason(err)
	if o, ok := p.obs.(TLSObserver); ok {
		o.TLSHandshakeFailed(reason)
	}
	if ok, more := p.tlsLogs.Allow(); ok {
		p.log.Info("TLS handshake refused", zap.Stringer("peer", peer), zap.String("reason", reason),
			zap.Error(err), zap.Uint64("refused_since_last_line", more+1))
	}
}

// tlsFailureReason classifies a failed server handshake (crypto/tls
// reports its alerts and checks as text).
func tlsFailureReason(err error) string {
	var ne net.Error
	msg := err.Error()
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return "closed"
	case strings.Contains(msg, "does not look like a TLS handshake"):
		return "not_tls"
	case strings.Contains(msg, "remote error") && strings.Contains(msg, "certificate"):
		return "server_certificate_refused" // the client's alert
	case strings.Contains(msg, "didn't provide a certificate"), strings.Contains(msg, "certificate required"):
		return "no_client_certificate"
	case strings.Contains(msg, "certificate"):
		return "bad_client_certificate"
	case strings.Contains(msg, "protocol version"), strings.Contains(msg, "cipher suite"),
		strings.Contains(msg, "application protocol"), strings.Contains(msg, "unsupported versions"):
		return "protocol_mismatch"
	}
	return "other"
}

// shed counts load held back or refused, when the observer counts it.
func (p *Proxy) shed(reason string) {
	if s, ok := p.obs.(ShedObserver); ok {
		s.Shed(reason)
	}
}

// methods lists the methods of every linked service that keep accepts.
func methods(keep func(protoreflect.MethodDescriptor) bool) map[string]bool {
	out := map[string]bool{}
	protoregistry.GlobalFiles.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		svcs := fd.Services()
		for i := range svcs.Len() {
			sd := svcs.Get(i)
			ms := sd.Methods()
			for j := range ms.Len() {
				md := ms.Get(j)
				if keep(md) {
					out["/"+string(sd.FullName())+"/"+string(md.Name())] = true
				}
			}
		}
		return true
	})
	return out
}

// limitListener bounds the client connections open at once on l.
func (p *Proxy) limitListener(l net.Listener) net.Listener {
	shed, _ := p.obs.(ShedObserver)
	th := limits.NewThrottle(time.Second)
	return limits.NewListener(l, p.cfg.Limits.MaxConnections, func(open int64) {
		if shed != nil {
			shed.Shed(metrics.ShedMaxConnections)
		}
		if ok, more := th.Allow(); ok {
			p.log.Warn("client connection refused: too many open connections (--max-connections)",
				zap.Int64("open", open), zap.Int("limit", p.cfg.Limits.MaxConnections),
				zap.Uint64("refused_since_last_line", more+1))
		}
	})
}
