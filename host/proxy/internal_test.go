package proxy

import (
	"testing"

	"google.golang.org/grpc/metadata"
)

func TestFilterMetadata(t *testing.T) {
	in := metadata.MD{
		":authority":              {"proxy:8443"},
		"content-type":            {"application/grpc"},
		"user-agent":              {"grpc-go/1.85.0"},
		"te":                      {"trailers"},
		"grpc-accept-encoding":    {"gzip"},
		"grpc-status-details-bin": {"x"},
		"connection":              {"keep-alive"},
		"authorization":           {"Bearer t"},
		"x-request-id":            {"1", "2"},
		"x-trace-bin":             {"\x00\x01"},
	}
	got := filterMetadata(in)
	want := metadata.MD{
		"authorization": {"Bearer t"},
		"x-request-id":  {"1", "2"},
		"x-trace-bin":   {"\x00\x01"},
	}
	if len(got) != len(want) {
		t.Fatalf("filterMetadata = %v, want %v", got, want)
	}
	for k, v := range want {
		if g := got[k]; len(g) != len(v) || g[0] != v[0] {
			t.Fatalf("filterMetadata[%q] = %q, want %q", k, g, v)
		}
	}
	got["x-request-id"][0] = "changed"
	if in["x-request-id"][0] != "1" {
		t.Fatal("filterMetadata shares value slices with its input")
	}
}
