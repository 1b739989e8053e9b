package authz_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/internal/callauth"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// BenchmarkSign measures ECDSA P-256 Sign calls over gRPC on loopback to
// one in-process enclave, side by side: anonymous (no authentication: the
// enclave runs with --dev-allow-anonymous and a policy, which checks
// authenticated calls only), each call signed by an Ed25519 or a P-256
// caller (the client signs, the enclave verifies, checks the replay cache
// and the policy), and calls in a session of the Ed25519 caller (opened
// once; each call MACed and checked, replay cache and policy included). ns/op of the serial runs is the latency of one call; the
// parallel runs (GOMAXPROCS goroutines) measure throughput. The figures
// are in docs/PERFORMANCE.md, "Caller authentication".
//
//	go test -run '^$' -bench BenchmarkSign -count 3 ./enclave/authz/
func BenchmarkSign(b *testing.B) {
	ids := map[string]*callauth.Identity{}
	var callers []any
	for _, kind := range []string{"ed25519", "p256"} {
		id, err := callauth.NewIdentity(kind)
		if err != nil {
			b.Fatal(err)
		}
		ids[kind] = id
		callers = append(callers, map[string]any{"name": kind, "public_key": string(id.PublicKeyPEM()), "sign": []any{map[string]any{}}})
	}
	raw, err := json.Marshal(map[string]any{"version": 1, "callers": callers})
	if err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(b.TempDir(), "policy.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		b.Fatal(err)
	}
	c := enclavetest.DefaultConfig()
	c.Log.Level = "error"
	c.Authz.PolicyFile = path // and anonymous calls allowed
	e := enclavetest.Start(b, c, 0)
	req := signReq(pb.KeyType_KEY_TYPE_ECC, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256)
	for _, tc := range []struct {
		name    string
		id      *callauth.Identity
		session bool
	}{{"anonymous", nil, false}, {"ed25519-caller", ids["ed25519"], false}, {"p256-caller", ids["p256"], false}, {"session", ids["ed25519"], true}} {
		cc := dial(b, e.Addr, tc.id)
		if tc.session {
			cc = dialSession(b, e.Addr, tc.id)
		}
		cl := pb.NewSignerServiceClient(cc)
		if _, err := cl.Sign(context.Background(), req); err != nil {
			b.Fatalf("%s: %v", tc.name, err)
		}
		b.Run(tc.name+"/serial", func(b *testing.B) {
			lat := make([]time.Duration, 0, 4096)
			for b.Loop() {
				start := time.Now()
				if _, err := cl.Sign(context.Background(), req); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
		b.Run(tc.name+"/parallel", func(b *testing.B) {
			b.SetParallelism(4)
			start := time.Now()
			defer func() { b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "calls/s") }()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := cl.Sign(context.Background(), req); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// dialSession connects as id with a session (the Go client's default).
func dialSession(t testing.TB, addr string, id *callauth.Identity) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(callauth.SessionUnaryClientInterceptor(id, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}
