package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"

	"github.com/nitrosign/nitrosign/host/pool"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// SlotStats is one upstream connection slot of the proxy.
type SlotStats struct {
	pool.ConnStats
	// Upstream is the slot's enclave address.
	Upstream string
	// KeysetMismatch: the enclave is out of rotation, its keyset differing
	// from the one the other upstreams serve.
	KeysetMismatch bool
}

// PoolStats is what the pool collector reads (the proxy's upstreams).
type PoolStats interface {
	Stats() []SlotStats
}

// Upstream is what the metrics read of the proxy's upstream connections:
// their state, and unary calls to the enclave (the stats scrape).
type Upstream interface {
	PoolStats
	grpc.ClientConnInterface
}

// RegisterPool exports p's connections at every scrape.
func (m *Metrics) RegisterPool(p PoolStats) {
	m.reg.MustRegister(&poolCollector{p: p})
}

var (
	poolConnsDesc = prometheus.NewDesc(Namespace+"_proxy_pool_connections",
		"Upstream connection slots by upstream and state (idle, connecting, ready: up and the enclave SERVING, transient_failure: down, not serving or out of rotation, shutdown).",
		[]string{"upstream", "state"}, nil)
	upstreamCallsDesc = prometheus.NewDesc(Namespace+"_proxy_upstream_calls_total",
		"Streams the proxy opened on each upstream's connections (relayed calls and its own health and keyset probes).",
		[]string{"upstream"}, nil)
	upstreamInFlightDesc = prometheus.NewDesc(Namespace+"_proxy_upstream_streams",
		"Streams open now on each upstream's connections.", []string{"upstream"}, nil)
	keysetMismatchDesc = prometheus.NewDesc(Namespace+"_proxy_upstream_keyset_mismatch",
		"1 when the upstream serves a keyset other than the one in rotation and is taken out of rotation, else 0.",
		[]string{"upstream"}, nil)
	poolRedialsDesc = prometheus.NewDesc(Namespace+"_proxy_pool_redials_total",
		"Dials of pooled connections beyond each connection's first: retries while the enclave is unreachable and reconnections after a loss.",
		nil, nil)
	poolDialErrorsDesc = prometheus.NewDesc(Namespace+"_proxy_pool_dial_errors_total",
		"Dials of pooled connections that failed.", nil, nil)
	poolReconnectsDesc = prometheus.NewDesc(Namespace+"_proxy_pool_reconnects_total",
		"Times a pooled connection became READY again after its first time (enclave restarts, lost connections).", nil, nil)
)

// poolStates are the label values, zero included, so every state is a
// series from the first scrape.
var poolStates = []connectivity.State{
	connectivity.Idle, connectivity.Connecting, connectivity.Ready, connectivity.TransientFailure, connectivity.Shutdown,
}

func stateLabel(s connectivity.State) string {
	switch s {
	case connectivity.Idle:
		return "idle"
	case connectivity.Connecting:
		return "connecting"
	case connectivity.Ready:
		return "ready"
	case connectivity.TransientFailure:
		return "transient_failure"
	default:
		return "shutdown"
	}
}

type poolCollector struct{ p PoolStats }

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- poolConnsDesc
	ch <- upstreamCallsDesc
	ch <- upstreamInFlightDesc
	ch <- keysetMismatchDesc
	ch <- poolRedialsDesc
	ch <- poolDialErrorsDesc
	ch <- poolReconnectsDesc
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	type key struct{ up, state string }
	byState := map[key]float64{}
	var ups []string
	calls, streams, mismatch := map[string]float64{}, map[string]float64{}, map[string]float64{}
	var redials, dialErrs, reconnects uint64
	for _, s := range c.p.Stats() {
		if _, seen := calls[s.Upstream]; !seen {
			ups = append(ups, s.Upstream)
		}
		byState[key{s.Upstream, stateLabel(s.State)}]++
		calls[s.Upstream] += float64(s.Calls)
		streams[s.Upstream] += float64(s.InFlight)
		if s.KeysetMismatch {
			mismatch[s.Upstream] = 1
		}
		if s.Dials > 1 {
			redials += s.Dials - 1
		}
		dialErrs += s.DialErrors
		if s.Readies > 1 {
			reconnects += s.Readies - 1
		}
	}
	for _, up := range ups {
		for _, st := range poolStates {
			l := stateLabel(st)
			ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, byState[key{up, l}], up, l)
		}
		ch <- prometheus.MustNewConstMetric(upstreamCallsDesc, prometheus.CounterValue, calls[up], up)
		ch <- prometheus.MustNewConstMetric(upstreamInFlightDesc, prometheus.GaugeValue, streams[up], up)
		ch <- prometheus.MustNewConstMetric(keysetMismatchDesc, prometheus.GaugeValue, mismatch[up], up)
	}
	ch <- prometheus.MustNewConstMetric(poolRedialsDesc, prometheus.CounterValue, float64(redials))
	ch <- prometheus.MustNewConstMetric(poolDialErrorsDesc, prometheus.CounterValue, float64(dialErrs))
	ch <- prometheus.MustNewConstMetric(poolReconnectsDesc, prometheus.CounterValue, float64(reconnects))
}

// DefaultEnclaveScrapeTimeout bounds the GetStats call of one scrape: well
// under Prometheus's default 10 s scrape timeout, and far above a healthy
// vsock round trip (well under a millisecond).
const DefaultEnclaveScrapeTimeout = 2 * time.Second

// RegisterEnclave exports the enclave's own counters: each scrape calls
// nitrosign.v1.StatsService/GetStats on cc (the proxy's upstreams) within
// timeout. When the enclave does not answer, nitrosign_enclave_up is 0 and
// its other series are absent from that scrape.
func (m *Metrics) RegisterEnclave(cc grpc.ClientConnInterface, timeout time.Duration, log *zap.Logger) {
	if timeout <= 0 {
		timeout = DefaultEnclaveScrapeTimeout
	}
	if log == nil {
		log = zap.NewNop()
	}
	m.reg.MustRegister(&enclaveCollector{client: pb.NewStatsServiceClient(cc), timeout: timeout, log: log})
}

var (
	enclaveUpDesc = prometheus.NewDesc(Namespace+"_enclave_up",
		"1 when the last scrape got the enclave's stats over vsock, else 0.", nil, nil)
	enclaveStartDesc = prometheus.NewDesc(Namespace+"_enclave_start_time_seconds",
		"When the enclave process started, Unix time; it changes when the enclave restarts (its counters then start from zero).", nil, nil)
	enclaveCallsDesc = prometheus.NewDesc(Namespace+"_enclave_calls_total",
		"Calls the enclave served, by full gRPC method and status code (errors: code != \"OK\").",
		[]string{"method", "code"}, nil)
	enclaveSigsDesc = prometheus.NewDesc(Namespace+"_enclave_signatures_total",
		"Signatures the enclave made, by KMS algorithm name.", []string{"algorithm"}, nil)
	enclaveKeyGenDesc = prometheus.NewDesc(Namespace+"_enclave_key_generation_seconds",
		"Time the enclave took to generate and self-test each start-up key.", []string{"key_type", "key_spec"}, nil)
	enclaveNSMDesc = prometheus.NewDesc(Namespace+"_enclave_nsm_calls_total",
		"Calls to the Nitro Secure Module by operation (attestation, random, seed_entropy) and result (ok, error).",
		[]string{"operation", "result"}, nil)
)

type enclaveCollector struct {
	client  pb.StatsServiceClient
	timeout time.Duration
	log     *zap.Logger
}

func (c *enclaveCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{enclaveUpDesc, enclaveStartDesc, enclaveCallsDesc, enclaveSigsDesc, enclaveKeyGenDesc, enclaveNSMDesc} {
		ch <- d
	}
}

func (c *enclaveCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	s, err := c.client.GetStats(ctx, &pb.GetStatsRequest{})
	if err != nil {
		c.log.Debug("enclave stats scrape failed", zap.Error(err))
		ch <- prometheus.MustNewConstMetric(enclaveUpDesc, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(enclaveUpDesc, prometheus.GaugeValue, 1)
	if st := s.GetStartTime(); st != nil {
		ch <- prometheus.MustNewConstMetric(enclaveStartDesc, prometheus.GaugeValue, float64(st.AsTime().UnixNano())/1e9)
	}
	// Labels are normalised to bounded sets; the sums keep the counts
	// right if two entries fold into one label.
	calls := map[[2]string]uint64{}
	for _, cc := range s.GetCalls() {
		calls[[2]string{MethodLabel(cc.GetMethod()), codeLabel(cc.GetCode())}] += cc.GetCount()
	}
	for k, n := range calls {
		ch <- prometheus.MustNewConstMetric(enclaveCallsDesc, prometheus.CounterValue, float64(n), k[0], k[1])
	}
	sigs := map[string]uint64{}
	for _, sc := range s.GetSignatures() {
		sigs[sigalg.Name(sc.GetAlgorithm())] += sc.GetCount()
	}
	for alg, n := range sigs {
		ch <- prometheus.MustNewConstMetric(enclaveSigsDesc, prometheus.CounterValue, float64(n), alg)
	}
	keys := map[[2]string]float64{}
	for _, k := range s.GetKeyGenerations() {
		keys[[2]string{sigalg.TypeName(k.GetKeyType()), sigalg.SpecName(k.GetKeySpec())}] = k.GetDuration().AsDuration().Seconds()
	}
	for k, d := range keys {
		ch <- prometheus.MustNewConstMetric(enclaveKeyGenDesc, prometheus.GaugeValue, d, k[0], k[1])
	}
	nsm := map[[2]string]uint64{}
	for _, n := range s.GetNsmCalls() {
		op := n.GetOperation()
		switch op {
		case "attestation", "random", "seed_entropy":
		default:
			op = "other"
		}
		res := "ok"
		if n.GetError() {
			res = "error"
		}
		nsm[[2]string{op, res}] += n.GetCount()
	}
	for k, n := range nsm {
		ch <- prometheus.MustNewConstMetric(enclaveNSMDesc, prometheus.CounterValue, float64(n), k[0], k[1])
	}
}
