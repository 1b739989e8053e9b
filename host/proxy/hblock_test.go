package proxy

import (
	"bytes"
	"errors"
	"reflect"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// encodeBlock is fields as one HPACK block (a fresh encoder: no dynamic
// table references).
func encodeBlock(fields ...string) []byte {
	var b bytes.Buffer
	enc := hpack.NewEncoder(&b)
	for i := 0; i+1 < len(fields); i += 2 {
		_ = enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return b.Bytes()
}

// headerFrames writes two header blocks as frames: the first on stream 1,
// split into HEADERS and CONTINUATION at split (when inside it), the
// second on stream 3.
func headerFrames(block1, block2 []byte, split int) []byte {
	var b bytes.Buffer
	w := http2.NewFramer(&b, nil)
	if split > 0 && split < len(block1) {
		_ = w.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block1[:split], EndStream: true})
		_ = w.WriteContinuation(1, true, block1[split:])
	} else {
		_ = w.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block1, EndStream: true, EndHeaders: true})
	}
	_ = w.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block2, EndHeaders: true})
	return b.Bytes()
}

// readOutcome is what a reader made of one frame: comparable across the
// two readers.
type readOutcome struct {
	Fields    []hpack.HeaderField
	Truncated bool
	Ended     bool
	ConnErr   int // -1: none
	StreamErr int // -1: none
	OtherErr  bool
}

func outcome(f http2.Frame, err error) readOutcome {
	o := readOutcome{ConnErr: -1, StreamErr: -1}
	var ce http2.ConnectionError
	var se http2.StreamError
	switch {
	case err == nil:
		mh := f.(*http2.MetaHeadersFrame)
		o.Fields = append([]hpack.HeaderField{}, mh.Fields...)
		o.Truncated, o.Ended = mh.Truncated, mh.StreamEnded()
	case errors.As(err, &ce):
		o.ConnErr = int(ce)
	case errors.As(err, &se):
		o.StreamErr = int(se.Code)
	default:
		o.OtherErr = true
	}
	return o
}

// readBoth reads the frames with x/net's ReadMetaHeaders and with
// frameReader, max being the header list limit of both.
func readBoth(frames []byte, max uint32) (want, got []readOutcome) {
	x := http2.NewFramer(nil, bytes.NewReader(frames))
	x.MaxHeaderListSize = max
	x.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	ours := newFrameReader(bytes.NewReader(frames), max)
	for range 2 {
		f, err := x.ReadFrame()
		want = append(want, outcome(f, err))
		g, gerr := ours.ReadFrame()
		got = append(got, outcome(g, gerr))
		if err != nil || gerr != nil {
			break
		}
	}
	return want, got
}

// TestFrameReaderMatchesXNet: every header block, valid or not, comes out
// of frameReader as out of x/net's Framer with ReadMetaHeaders: the same
// fields, truncation, and error (connection or stream, and its code).
func TestFrameReaderMatchesXNet(t *testing.T) {
	grpcReq := encodeBlock(":method", "POST", ":scheme", "http", ":path", "/nitrosign.v1.SignerService/Echo",
		":authority", "localhost", "content-type", "application/grpc", "te", "trailers", "grpc-timeout", "1S")
	cases := []struct {
		name   string
		block1 []byte
		block2 []byte
		split  int
		max    uint32
	}{
		{"gRPC request, then trailers", grpcReq, encodeBlock("grpc-status", "0", "grpc-message", ""), 0, 0},
		{"split over CONTINUATION", grpcReq, encodeBlock(":status", "200"), 7, 0},
		{"dynamic table shared by the blocks", grpcReq, grpcReq, 0, 0},
		{"uppercase name", encodeBlock(":path", "/a", "X-Up", "1"), encodeBlock("a", "b"), 0, 0},
		{"name not a token", encodeBlock("a b", "1"), nil, 0, 0},
		{"value with a newline", encodeBlock("a", "1\n2"), nil, 0, 0},
		{"pseudo after regular", encodeBlock("a", "1", ":path", "/x"), nil, 0, 0},
		{"unknown pseudo", encodeBlock(":nope", "1"), nil, 0, 0},
		{"duplicate pseudo", encodeBlock(":path", "/a", ":path", "/b"), nil, 0, 0},
		{"request and response pseudos", encodeBlock(":path", "/a", ":status", "200"), nil, 0, 0},
		{"over the list limit: truncated", grpcReq, nil, 0, 150},
		{"far over the list limit", grpcReq, nil, 0, 20},
		{"trailer field counted per name", encodeBlock("trailer", "a,b,c,d", "x", "y"), nil, 0, 130},
		{"invalid field, then CONTINUATION", encodeBlock("A", "1", "b", "2"), nil, 3, 0},
		{"bad HPACK", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, nil, 0, 0},
		{"index out of the table", []byte{0xfe}, nil, 0, 0},
		{"truncated block", grpcReq[:len(grpcReq)-3], nil, 0, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			want, got := readBoth(headerFrames(tc.block1, tc.block2, tc.split), tc.max)
			if !reflect.DeepEqual(want, got) {
				t.Fatalf("x/net: %+v\nours:  %+v", want, got)
			}
		})
	}
}

// TestFrameReaderReusesItsFields: a second block does not allocate, and
// its fields replace the first's (whoever keeps fields copies them).
func TestFrameReaderReusesItsFields(t *testing.T) {
	// Fields of the static table: a literal would cost its string.
	block := encodeBlock(":status", "200", "accept-encoding", "gzip, deflate")
	var frames []byte
	for range 50 {
		frames = append(frames, headerFrames(block, block, 0)...)
	}
	r := newFrameReader(bytes.NewReader(frames), 0)
	if _, err := r.ReadFrame(); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(50, func() {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if got := f.(*http2.MetaHeadersFrame).PseudoValue("status"); got != "200" {
			t.Fatalf(":status %q", got)
		}
	})
	// The Framer's own HeadersFrame is the one allocation left.
	if allocs > 1 {
		t.Fatalf("%v allocations per header block, want at most 1", allocs)
	}
}

// FuzzHeaderBlocks compares frameReader with x/net's ReadMetaHeaders on
// arbitrary header blocks.
//
//	go test -run='^$' -fuzz=FuzzHeaderBlocks -fuzztime=30s ./host/proxy/
func FuzzHeaderBlocks(f *testing.F) {
	req := encodeBlock(":method", "POST", ":path", "/a", "content-type", "application/grpc", "trailer", "x,y")
	f.Add(req, encodeBlock("grpc-status", "0"), uint8(0), uint16(0))
	f.Add(req, req, uint8(5), uint16(120))
	f.Add(encodeBlock("A", "1"), []byte{0x82}, uint8(1), uint16(0))
	f.Add([]byte{0x3f, 0xe1, 0x1f}, []byte{0xbe}, uint8(0), uint16(0))
	f.Fuzz(func(t *testing.T, block1, block2 []byte, split uint8, max uint16) {
		want, got := readBoth(headerFrames(block1, block2, int(split)), uint32(max))
		if !reflect.DeepEqual(want, got) {
			t.Fatalf("x/net: %+v\nours:  %+v", want, got)
		}
	})
}
