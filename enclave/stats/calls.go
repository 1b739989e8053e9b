package stats

import (
	"context"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstats "google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// numCodes is the number of gRPC status codes, OK to Unauthenticated.
const numCodes = int(codes.Unauthenticated) + 1

// methodCalls counts the calls of one method by status code.
type methodCalls struct {
	name  string
	codes [numCodes]atomic.Uint64
}

func (m *methodCalls) inc(c codes.Code) {
	if int(c) >= numCodes {
		// Only a handler's own status can carry a code outside the
		// standard ones; the proxy exports it as Unknown anyway.
		c = codes.Unknown
	}
	m.codes[c].Add(1)
}

// methodKey is the context key of a call's *methodCalls.
type methodKey struct{}

// Handler is the grpc stats.Handler that counts every call its server
// answers once, by method and status code, including the calls grpc-go
// answers before any interceptor runs (see the package doc for what it
// cannot see). Install it on one server with grpc.StatsHandler; it is for
// servers only.
//
// The hot path takes no lock: the counters of every registered method are
// made once, at the first call, and a call costs one map lookup (in
// TagRPC), one context value (the only allocation of its own, as a stats
// handler can only find its call again through the context) and one atomic
// add (at End).
type Handler struct {
	services func() map[string]grpc.ServiceInfo
	once     sync.Once
	methods  atomic.Pointer[map[string]*methodCalls] // read-only once set
	unknown  methodCalls
}

var _ grpcstats.Handler = (*Handler)(nil)

// Handler returns a new call counter for one server, whose counts Snapshot
// reports. services returns the services registered on that server
// (grpc.Server.GetServiceInfo); it is called once, at the server's first
// call: grpc-go refuses RegisterService after Serve, so the set is final
// by then.
func (s *Stats) Handler(services func() map[string]grpc.ServiceInfo) *Handler {
	h := &Handler{services: services, unknown: methodCalls{name: UnknownMethod}}
	s.mu.Lock()
	s.handlers = append(s.handlers, h)
	s.mu.Unlock()
	return h
}

func (h *Handler) table() map[string]*methodCalls {
	if t := h.methods.Load(); t != nil {
		return *t
	}
	h.once.Do(func() {
		t := map[string]*methodCalls{}
		for svc, info := range h.services() {
			for _, m := range info.Methods {
				name := "/" + svc + "/" + m.Name
				t[name] = &methodCalls{name: name}
			}
		}
		h.methods.Store(&t)
	})
	return *h.methods.Load()
}

// TagRPC finds the counters of the call's method. A method not registered
// on the server is counted at once, as UnknownMethod with Unimplemented:
// grpc-go answers it with Unimplemented without running a handler, and
// sends no Begin or End for it (the server sets no UnknownServiceHandler).
// Its context gets no counters, so an End, were grpc-go ever to send one,
// would not count it twice.
func (h *Handler) TagRPC(ctx context.Context, info *grpcstats.RPCTagInfo) context.Context {
	m := h.table()[info.FullMethodName]
	if m == nil {
		h.unknown.inc(codes.Unimplemented)
		return ctx
	}
	return context.WithValue(ctx, methodKey{}, m)
}

// HandleRPC counts a call of a registered method at its End, with the
// status it was answered with. That is just after the status was handed to
// the transport: a caller that reads the counts right after its call ends
// may, rarely, not see that call yet.
func (h *Handler) HandleRPC(ctx context.Context, s grpcstats.RPCStats) {
	end, ok := s.(*grpcstats.End)
	if !ok || end.Client {
		return
	}
	if m, _ := ctx.Value(methodKey{}).(*methodCalls); m != nil {
		m.inc(status.Code(end.Error))
	}
}

// TagConn does nothing: calls are counted, not connections.
func (*Handler) TagConn(ctx context.Context, _ *grpcstats.ConnTagInfo) context.Context { return ctx }

// HandleConn does nothing.
func (*Handler) HandleConn(context.Context, grpcstats.ConnStats) {}

// each calls fn for every method and code counted at least once.
func (h *Handler) each(fn func(method string, c codes.Code, n uint64)) {
	ms := []*methodCalls{&h.unknown}
	if t := h.methods.Load(); t != nil {
		for _, m := range *t {
			ms = append(ms, m)
		}
	}
	for _, m := range ms {
		for c := range m.codes {
			if n := m.codes[c].Load(); n > 0 {
				fn(m.name, codes.Code(c), n)
			}
		}
	}
}
