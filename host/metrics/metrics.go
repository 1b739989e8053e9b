// Package metrics is the host proxy's Prometheus instrumentation: calls by
// method and code, latency histograms, calls in flight and upstream errors
// (fed by the proxy through the Observer methods), the pool's connections
// by state, redials and reconnects (read from the pool at scrape time), the
// enclave's own counters (fetched over vsock from nitrosign.v1.StatsService
// at scrape time: the enclave has no network), and the Go and process
// collectors. Server serves them on their own HTTP address.
//
// Every label value comes from a bounded set: a method the proxy does not
// know (it forwards any method name a client sends) is counted as "other",
// so a client cannot grow the series without bound.
package metrics

import (
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Namespace prefixes every nitrosign metric.
const Namespace = "nitrosign"

// OtherMethod is the method label of calls to methods the proxy does not
// know.
const OtherMethod = "other"

// Upstream error reasons (label "reason" of
// nitrosign_proxy_upstream_errors_total).
const (
	// ReasonNoReadyConnection: the call was refused at once because no
	// pooled connection was READY (enclave down, restarting or draining).
	ReasonNoReadyConnection = "no_ready_connection"
	// ReasonUnavailable: the upstream call ended Unavailable after it
	// started (connection lost mid-call, enclave shutting down).
	ReasonUnavailable = "unavailable"
	// ReasonServerFault: the enclave (or the hop) ended the call with
	// Internal, Unknown or DataLoss.
	ReasonServerFault = "server_fault"
)

// Shed reasons (label "reason" of nitrosign_proxy_shed_total).
const (
	// ShedMaxConnections: a client connection beyond --max-connections was
	// closed at once.
	ShedMaxConnections = "max_connections"
	// ShedMaxInFlight: a call beyond --max-in-flight was answered
	// ResourceExhausted at once.
	ShedMaxInFlight = "max_in_flight"
	// ShedConnectionShare: a call beyond its connection's share of the
	// enclave (--max-connection-calls) was answered ResourceExhausted.
	ShedConnectionShare = "connection_share"
	// ShedMemoryBudget: a call arriving while the proxy was over its
	// memory budget (--memory-budget) was answered ResourceExhausted.
	ShedMemoryBudget = "memory_budget"
	// ShedUpstreamBusy: a call found every upstream connection full (the
	// enclave's stream limit) or congested and was answered
	// ResourceExhausted.
	ShedUpstreamBusy = "upstream_busy"
	// ShedTooManyResets: a client connection reset more streams than its
	// budget (--max-client-resets) and was sent GOAWAY ENHANCE_YOUR_CALM.
	ShedTooManyResets = "too_many_resets"
	// ShedReadPaused: a client connection's reader paused because the
	// connection had more queued than --max-connection-buffer.
	ShedReadPaused = "read_paused"
	// ShedAbuse: a client connection was sent GOAWAY ENHANCE_YOUR_CALM for
	// a flood of SETTINGS, of malformed requests, or a header block in
	// endless CONTINUATION frames.
	ShedAbuse = "abuse"
)

// shedReasons are the valid Shed reasons.
var shedReasons = []string{ShedMaxConnections, ShedMaxInFlight, ShedConnectionShare, ShedMemoryBudget,
	ShedUpstreamBusy, ShedTooManyResets, ShedReadPaused, ShedAbuse}

// LatencyBuckets are the call duration histogram's upper bounds, in
// seconds: from 100 µs (a vsock round trip is about 124 µs p50, an ECDSA
// P-256 signature about 36 µs) to 10 s (far beyond any healthy call; RSA-4096
// signing is tens of milliseconds).
var LatencyBuckets = []float64{
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
}

// Metrics holds the proxy's registry and instruments. Its methods are safe
// for concurrent use.
type Metrics struct {
	reg            *prometheus.Registry
	calls          *prometheus.CounterVec
	latency        *prometheus.HistogramVec
	inFlight       prometheus.Gauge
	upstreamErrors *prometheus.CounterVec
	shed           *prometheus.CounterVec
	tlsFailures    *prometheus.CounterVec
	// series are the children of calls and latency for each method
	// label, looked up once (a label lookup hashes the values and takes
	// the vector's lock, on the path of every call).
	series map[string]*methodSeries
}

// methodSeries is one method label's series, each created on first use
// (so /metrics shows only what happened, as with WithLabelValues).
type methodSeries struct {
	label   string // the method label (OtherMethod for unknown methods)
	latency atomic.Pointer[prometheus.Observer]
	calls   [codes.Unauthenticated + 1]atomic.Pointer[prometheus.Counter]
}

// TLS handshake failure reasons (label "reason" of
// nitrosign_proxy_tls_handshake_failures_total).
var TLSFailureReasons = []string{"not_tls", "no_client_certificate", "bad_client_certificate",
	"server_certificate_refused", "protocol_mismatch", "timeout", "closed", "other"}

// New makes a registry with the proxy's instruments and the Go and process
// collectors. Pool and enclave collectors are added with RegisterPool and
// RegisterEnclave.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "proxy", Name: "calls_total",
			Help: "Calls served by the proxy, by full gRPC method (\"other\" for methods it does not know) and status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: "proxy", Name: "call_duration_seconds",
			Help:    "Duration of calls served by the proxy, from the first byte received to the status sent, by method.",
			Buckets: LatencyBuckets,
		}, []string{"method"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Subsystem: "proxy", Name: "calls_in_flight",
			Help: "Calls the proxy is serving now.",
		}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "proxy", Name: "upstream_errors_total",
			Help: "Forwarded calls that failed because of the upstream hop or the enclave: no_ready_connection, unavailable, server_fault.",
		}, []string{"reason"}),
		shed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "proxy", Name: "shed_total",
			Help: "Load the proxy shed or held back: client connections closed beyond --max-connections (max_connections); calls answered ResourceExhausted beyond --max-in-flight (max_in_flight), beyond their connection's share (connection_share), over the memory budget (memory_budget) or with every upstream connection full (upstream_busy); connections sent GOAWAY for resetting too many streams (too_many_resets) or for floods of SETTINGS, malformed requests or CONTINUATION frames (abuse); client readers paused for queuing too much (read_paused).",
		}, []string{"reason"}),
		tlsFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "proxy", Name: "tls_handshake_failures_total",
			Help: "Client TLS handshakes refused, by reason: not_tls (plaintext or another protocol on the TLS port), no_client_certificate, bad_client_certificate (unknown CA, expired, wrong usage), server_certificate_refused (the client does not trust the proxy's certificate), protocol_mismatch (versions, cipher suites, ALPN), timeout, closed (the client left), other.",
		}, []string{"reason"}),
	}
	// Pre-create the reasons so that rate() works from the first scrape.
	m.series = make(map[string]*methodSeries, len(knownMethods)+1)
	for method := range knownMethods {
		m.series[method] = &methodSeries{label: method}
	}
	m.series[OtherMethod] = &methodSeries{label: OtherMethod}
	for _, r := range TLSFailureReasons {
		m.tlsFailures.WithLabelValues(r)
	}
	for _, r := range []string{ReasonNoReadyConnection, ReasonUnavailable, ReasonServerFault} {
		m.upstreamErrors.WithLabelValues(r)
	}
	for _, r := range shedReasons {
		m.shed.WithLabelValues(r)
	}
	m.reg.MustRegister(m.calls, m.latency, m.inFlight, m.upstreamErrors, m.shed, m.tlsFailures,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Registry is the registry to serve or gather.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// CallStarted counts a call in flight.
func (m *Metrics) CallStarted(string) { m.inFlight.Inc() }

// CallFinished records a finished call.
func (m *Metrics) CallFinished(method string, code codes.Code, elapsed time.Duration) {
	m.inFlight.Dec()
	s, ok := m.series[method] // the known methods and OtherMethod: MethodLabel's labels
	if !ok {
		s = m.series[OtherMethod]
	}
	method = s.label
	if int(code) < len(s.calls) {
		c := s.calls[code].Load()
		if c == nil {
			cc := m.calls.WithLabelValues(method, code.String())
			c = &cc
			s.calls[code].Store(c)
		}
		(*c).Inc()
	} else {
		m.calls.WithLabelValues(method, code.String()).Inc()
	}
	o := s.latency.Load()
	if o == nil {
		oo := m.latency.WithLabelValues(method)
		o = &oo
		s.latency.Store(o)
	}
	(*o).Observe(elapsed.Seconds())
}

// TLSHandshakeFailed counts a refused client handshake; reason is one of
// TLSFailureReasons (anything else counts as "other").
func (m *Metrics) TLSHandshakeFailed(reason string) {
	if !slices.Contains(TLSFailureReasons, reason) {
		reason = "other"
	}
	m.tlsFailures.WithLabelValues(reason).Inc()
}

// Shed counts load the proxy shed; reason is one of the Shed constants.
func (m *Metrics) Shed(reason string) {
	if !slices.Contains(shedReasons, reason) {
		reason = ShedMaxInFlight
	}
	m.shed.WithLabelValues(reason).Inc()
}

// UpstreamError counts a forwarded call that failed upstream; reason is one
// of the Reason constants.
func (m *Metrics) UpstreamError(reason string) {
	switch reason {
	case ReasonNoReadyConnection, ReasonUnavailable, ReasonServerFault:
	default:
		reason = ReasonServerFault
	}
	m.upstreamErrors.WithLabelValues(reason).Inc()
}

// knownMethods are the full method names used as labels as they are.
var knownMethods = func() map[string]bool {
	m := map[string]bool{}
	for _, sd := range []grpc.ServiceDesc{
		pb.EchoService_ServiceDesc,
		pb.SignerService_ServiceDesc,
		pb.AttestationService_ServiceDesc,
		pb.StatsService_ServiceDesc,
		healthpb.Health_ServiceDesc,
		reflectionv1.ServerReflection_ServiceDesc,
		reflectionv1alpha.ServerReflection_ServiceDesc,
	} {
		for _, md := range sd.Methods {
			m["/"+sd.ServiceName+"/"+md.MethodName] = true
		}
		for _, st := range sd.Streams {
			m["/"+sd.ServiceName+"/"+st.StreamName] = true
		}
	}
	return m
}()

// MethodLabel is method when it is a nitrosign, health or reflection
// method, else OtherMethod.
func MethodLabel(method string) string {
	if knownMethods[method] {
		return method
	}
	return OtherMethod
}

// codeLabel is a code name as the enclave sent it when it is a gRPC code
// name, else "Unknown".
func codeLabel(s string) string {
	if knownCodes[s] {
		return s
	}
	return codes.Unknown.String()
}

var knownCodes = func() map[string]bool {
	m := map[string]bool{}
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		m[c.String()] = true
	}
	return m
}()

// RegisterTLSCertExpiry adds nitrosign_proxy_tls_cert_expiry_seconds: the
// NotAfter, as Unix time, of the TLS certificate the proxy serves, read
// from notAfter at each scrape (the zero time reads as 0). Register it only
// when the proxy serves TLS. Alert on it, e.g.
// nitrosign_proxy_tls_cert_expiry_seconds - time() < 14*86400.
func (m *Metrics) RegisterTLSCertExpiry(notAfter func() time.Time) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: Namespace, Subsystem: "proxy", Name: "tls_cert_expiry_seconds",
		Help: "Expiry (NotAfter, Unix time) of the TLS certificate the proxy serves now; updated at start-up and on every reload (SIGHUP).",
	}, func() float64 {
		t := notAfter()
		if t.IsZero() {
			return 0
		}
		return float64(t.Unix())
	}))
}
