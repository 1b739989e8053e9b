package e2e

import (
	"context"
	"strings"
	"testing"

	"github.com/nitrosign/nitrosign/host/metrics/metricstest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Metrics after known traffic over vsock: the proxy's /metrics parses, its
// own counters match the calls made, and the enclave's counters (fetched
// over vsock through the StatsService) are there too.
func TestMetricsAfterTraffic(t *testing.T) {
	e := startEnclave(t, vsockPort())
	metricsAddr := tcpAddr(t)
	p := startProxy(t, e.target, 2, "--metrics-listen", metricsAddr)
	c := dial(t, p.target, 1)
	ecc := &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}
	const signs, echoes = 7, 5
	for range signs {
		if _, err := c.Signer.Sign(callCtx(t), &pb.SignRequest{Key: ecc, Message: []byte("m")}); err != nil {
			t.Fatal(err)
		}
	}
	for range echoes {
		if _, err := c.Echo.Echo(callCtx(t), &pb.EchoRequest{Payload: []byte("e")}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Signer.Sign(callCtx(t), &pb.SignRequest{Key: ecc, Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256}); err == nil {
		t.Fatal("a mismatched algorithm was accepted")
	}

	fams, text, err := metricstest.Scrape(context.Background(), "http://"+metricsAddr+"/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	want := []struct {
		name   string
		labels map[string]string
		value  float64
	}{
		{"nitrosign_proxy_calls_total", map[string]string{"method": "/nitrosign.v1.SignerService/Sign", "code": "OK"}, signs},
		{"nitrosign_proxy_calls_total", map[string]string{"method": "/nitrosign.v1.SignerService/Sign", "code": "InvalidArgument"}, 1},
		{"nitrosign_proxy_calls_total", map[string]string{"method": "/nitrosign.v1.EchoService/Echo", "code": "OK"}, echoes},
		{"nitrosign_proxy_pool_connections", map[string]string{"state": "ready"}, 2},
		{"nitrosign_enclave_up", nil, 1},
		{"nitrosign_enclave_signatures_total", map[string]string{"algorithm": "ECDSA_SHA_256"}, signs},
		{"nitrosign_enclave_calls_total", map[string]string{"method": "/nitrosign.v1.EchoService/Echo", "code": "OK"}, echoes},
	}
	for _, w := range want {
		got, ok := fams.Value(w.name, w.labels)
		if !ok || got != w.value {
			t.Errorf("%s%v = %v (present %v), want %v", w.name, w.labels, got, ok, w.value)
		}
	}
	var excerpt []string
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "nitrosign_") && !strings.Contains(l, "_bucket") {
			excerpt = append(excerpt, l)
		}
	}
	t.Logf("scraped after the traffic:\n%s", strings.Join(excerpt, "\n"))
}
