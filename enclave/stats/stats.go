// Package stats counts what the enclave does (calls by method and code,
// signatures by algorithm, key generation time, NSM calls) and serves the
// counts over the nitrosign.v1.StatsService RPC.
//
// Calls are counted by a grpc stats.Handler (Stats.Handler), not an
// interceptor, so the calls grpc-go answers itself before any interceptor
// runs are counted too: a request larger than the server's MaxRecvMsgSize
// (ResourceExhausted), an unknown service or method (Unimplemented), an
// unsupported grpc-encoding (Unimplemented). What grpc-go refuses before
// it starts a call (TagRPC) never reaches a stats handler and is not
// counted: in the HTTP/2 transport, a malformed grpc-timeout or binary
// metadata header, a wrong content-type or :method, a missing :authority, a
// deadline already passed on arrival, a stream beyond MaxConcurrentStreams,
// an oversized header block; in the server, a :path that is not
// /service/method.
//
// The enclave has no network, so Prometheus cannot scrape it: the host proxy
// calls GetStats over vsock on each scrape of its own /metrics and exports
// the result as nitrosign_enclave_* metrics (host/metrics). Nothing here
// sees key material or message bytes; labels are bounded sets (registered
// method names or UnknownMethod, status codes, algorithm enum values).
package stats

import (
	"context"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/fx"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/enclave/attest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// NSM operation names, as reported in NsmCallCount.operation.
const (
	OpAttestation = "attestation"
	OpRandom      = "random"
	OpSeedEntropy = "seed_entropy"
)

// UnknownMethod is the method of the calls counted for a method not
// registered on the server. Callers choose the method names they send, so
// all of them fold into this one value: the counters, GetStats and the
// proxy's method label stay bounded whatever a caller sends.
const UnknownMethod = "unknown"

// Module provides *Stats.
var Module = fx.Module("stats", fx.Provide(New))

type callKey struct{ method, code string }

type nsmKey struct {
	op  string
	err bool
}

// counters is a map of monotonic counters: lookups of an existing key take
// a read lock only, so the hot path does not serialise calls.
type counters[K comparable] struct {
	mu sync.RWMutex
	m  map[K]*atomic.Uint64
}

func (c *counters[K]) inc(k K) {
	c.mu.RLock()
	v, ok := c.m[k]
	c.mu.RUnlock()
	if !ok {
		c.mu.Lock()
		if c.m == nil {
			c.m = map[K]*atomic.Uint64{}
		}
		if v, ok = c.m[k]; !ok {
			v = new(atomic.Uint64)
			c.m[k] = v
		}
		c.mu.Unlock()
	}
	v.Add(1)
}

func (c *counters[K]) each(fn func(K, uint64)) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for k, v := range c.m {
		fn(k, v.Load())
	}
}

// Stats holds the enclave's counters. It is safe for concurrent use.
type Stats struct {
	start time.Time
	sigs  counters[pb.SigningAlgorithm]
	nsm   counters[nsmKey]

	mu       sync.Mutex
	keyGen   []*pb.KeyGeneration
	handlers []*Handler // the call counters, one per server
}

// New returns empty counters, started now.
func New() *Stats { return &Stats{start: time.Now()} }

// ObserveSignature counts one signature made with alg.
func (s *Stats) ObserveSignature(alg pb.SigningAlgorithm) { s.sigs.inc(alg) }

// ObserveNSM counts one NSM call.
func (s *Stats) ObserveNSM(op string, err error) { s.nsm.inc(nsmKey{op, err != nil}) }

// ObserveKeys records how long each start-up key took to generate and
// self-test (took, by key id, from signer.GenerationTimes).
func (s *Stats) ObserveKeys(keys []*pb.KeyInfo, took map[string]time.Duration) {
	out := make([]*pb.KeyGeneration, 0, len(keys))
	for _, k := range keys {
		out = append(out, &pb.KeyGeneration{KeyId: k.GetKeyId(), KeyType: k.GetKeyType(), KeySpec: k.GetKeySpec(), Duration: durationpb.New(took[k.GetKeyId()])})
	}
	s.mu.Lock()
	s.keyGen = out
	s.mu.Unlock()
}

// Snapshot returns every counter, in a stable order.
func (s *Stats) Snapshot() *pb.GetStatsResponse {
	resp := &pb.GetStatsResponse{StartTime: timestamppb.New(s.start)}
	s.mu.Lock()
	handlers := s.handlers
	s.mu.Unlock()
	calls := map[callKey]uint64{}
	for _, h := range handlers {
		h.each(func(method string, c codes.Code, n uint64) { calls[callKey{method, c.String()}] += n })
	}
	for k, n := range calls {
		resp.Calls = append(resp.Calls, &pb.CallCount{Method: k.method, Code: k.code, Count: n})
	}
	sort.Slice(resp.Calls, func(i, j int) bool {
		a, b := resp.Calls[i], resp.Calls[j]
		return a.Method < b.Method || (a.Method == b.Method && a.Code < b.Code)
	})
	s.sigs.each(func(a pb.SigningAlgorithm, n uint64) {
		resp.Signatures = append(resp.Signatures, &pb.SignatureCount{Algorithm: a, Count: n})
	})
	sort.Slice(resp.Signatures, func(i, j int) bool { return resp.Signatures[i].Algorithm < resp.Signatures[j].Algorithm })
	s.nsm.each(func(k nsmKey, n uint64) {
		resp.NsmCalls = append(resp.NsmCalls, &pb.NsmCallCount{Operation: k.op, Error: k.err, Count: n})
	})
	sort.Slice(resp.NsmCalls, func(i, j int) bool {
		a, b := resp.NsmCalls[i], resp.NsmCalls[j]
		return a.Operation < b.Operation || (a.Operation == b.Operation && !a.Error && b.Error)
	})
	s.mu.Lock()
	resp.KeyGenerations = append(resp.KeyGenerations, s.keyGen...)
	s.mu.Unlock()
	return resp
}

// Service serves GetStats.
type Service struct {
	pb.UnimplementedStatsServiceServer
	stats *Stats
}

var _ pb.StatsServiceServer = (*Service)(nil)

// NewService serves s.
func NewService(s *Stats) *Service { return &Service{stats: s} }

// GetStats returns a snapshot.
func (v *Service) GetStats(context.Context, *pb.GetStatsRequest) (*pb.GetStatsResponse, error) {
	return v.stats.Snapshot(), nil
}

// WrapNSM counts n's Attestation and Random calls. The result implements
// attest.Simulation exactly when n does, so the attester still tells
// simulated documents from genuine ones.
func (s *Stats) WrapNSM(n attest.NSM) attest.NSM {
	c := &countingNSM{NSM: n, stats: s}
	if sim, ok := n.(attest.Simulation); ok {
		return &countingSimNSM{countingNSM: c, Simulation: sim}
	}
	return c
}

type countingNSM struct {
	attest.NSM
	stats *Stats
}

func (c *countingNSM) Attestation(nonce, userData, publicKey []byte) ([]byte, error) {
	doc, err := c.NSM.Attestation(nonce, userData, publicKey)
	c.stats.ObserveNSM(OpAttestation, err)
	return doc, err
}

func (c *countingNSM) Random(p []byte) error {
	err := c.NSM.Random(p)
	c.stats.ObserveNSM(OpRandom, err)
	return err
}

type countingSimNSM struct {
	*countingNSM
	attest.Simulation
}

// WrapSeeder counts SeedKernelEntropy calls (one NSM random request each).
func (s *Stats) WrapSeeder(sd attest.Seeder) attest.Seeder {
	return &countingSeeder{Seeder: sd, stats: s}
}

type countingSeeder struct {
	attest.Seeder
	stats *Stats
}

func (c *countingSeeder) SeedKernelEntropy() error {
	err := c.Seeder.SeedKernelEntropy()
	c.stats.ObserveNSM(OpSeedEntropy, err)
	return err
}
