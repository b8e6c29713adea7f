// Interop driver for the Python Hessian 2.0 serializer, run against Caucho Hessian 4.0.38.
//
//   java HessianDriver encode        prints "name<TAB>hex" for every named sample below
//   java HessianDriver decode        reads "name<TAB>count<TAB>hex" lines on stdin, decodes
//                                    count values with Hessian2Input, and prints
//                                    "name<TAB>OK<TAB>desc<TAB>hex-of-java-re-encoding"
//                                    or "name<TAB>ERR<TAB>message"
//
// "desc" is a canonical description of the Java objects (see describe()); the Python tests
// predict it from the Python values they encoded. One JVM run per direction.

import com.caucho.hessian.io.Hessian2Input;
import com.caucho.hessian.io.Hessian2Output;
import com.caucho.hessian.io.SerializerFactory;
import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.io.Serializable;
import java.lang.reflect.Array;
import java.lang.reflect.Field;
import java.lang.reflect.Modifier;
import java.nio.charset.StandardCharsets;
import java.util.*;

public class HessianDriver {

  public enum Color { RED, GREEN, BLUE }

  public static class Person implements Serializable {
    public String name;
    public int age;
    public long id;
    public double score;
    public boolean active;
    public List<Object> tags;
    public Person friend;
    public Map<String, Object> extra;
    public Color color;

    public Person() {}

    public Person(String name, int age, long id) {
      this.name = name;
      this.age = age;
      this.id = id;
    }
  }

  public static class Box implements Serializable {
    public Object value;

    public Box() {}

    public Box(Object value) { this.value = value; }
  }

  // 17 small classes so that class indexes above 15 use the 'O' form.
  public static class K0 implements Serializable { public int v = 0; }
  public static class K1 implements Serializable { public int v = 1; }
  public static class K2 implements Serializable { public int v = 2; }
  public static class K3 implements Serializable { public int v = 3; }
  public static class K4 implements Serializable { public int v = 4; }
  public static class K5 implements Serializable { public int v = 5; }
  public static class K6 implements Serializable { public int v = 6; }
  public static class K7 implements Serializable { public int v = 7; }
  public static class K8 implements Serializable { public int v = 8; }
  public static class K9 implements Serializable { public int v = 9; }
  public static class K10 implements Serializable { public int v = 10; }
  public static class K11 implements Serializable { public int v = 11; }
  public static class K12 implements Serializable { public int v = 12; }
  public static class K13 implements Serializable { public int v = 13; }
  public static class K14 implements Serializable { public int v = 14; }
  public static class K15 implements Serializable { public int v = 15; }
  public static class K16 implements Serializable { public int v = 16; }

  static final SerializerFactory FACTORY = new SerializerFactory();

  static String repeat(String s, int n) {
    StringBuilder sb = new StringBuilder();
    for (int i = 0; i < n; i++) sb.append(s);
    return sb.toString();
  }

  static byte[] bytes(int n) {
    byte[] b = new byte[n];
    for (int i = 0; i < n; i++) b[i] = (byte) (i * 7 + 3);
    return b;
  }

  static Map<String, Object[]> samples() {
    Map<String, Object[]> s = new LinkedHashMap<>();
    s.put("null", new Object[] {null});
    s.put("true", new Object[] {true});
    s.put("false", new Object[] {false});
    int[] ints = {0, 1, -1, -16, 47, 48, -17, -2048, 2047, 2048, -2049, -262144, 262143, 262144,
      -262145, Integer.MAX_VALUE, Integer.MIN_VALUE};
    for (int v : ints) s.put("int_" + v, new Object[] {v});
    long[] longs = {0L, -8L, 15L, 16L, -9L, -2048L, 2047L, 2048L, -2049L, -262144L, 262143L,
      262144L, -262145L, Integer.MAX_VALUE, Integer.MIN_VALUE, Integer.MAX_VALUE + 1L,
      Integer.MIN_VALUE - 1L, Long.MAX_VALUE, Long.MIN_VALUE};
    for (long v : longs) s.put("long_" + v, new Object[] {v});
    s.put("short_300", new Object[] {(short) 300});
    s.put("byte_-5", new Object[] {(byte) -5});
    double[] doubles = {0.0, -0.0, 1.0, -1.0, 2.0, 127.0, -128.0, 128.0, -129.0, 32767.0,
      -32768.0, 32768.0, -32769.0, 1.5, 0.1, -0.001, 12.25, 3.14159, 2147483.647, -2147483.648,
      2147483.648, 1e10, 1e-10, 1e300, Double.MIN_VALUE, Double.MAX_VALUE, Double.NaN,
      Double.POSITIVE_INFINITY, Double.NEGATIVE_INFINITY, 65536.5, 0.5, 100000.0, 1.0E7};
    for (double v : doubles) s.put("double_" + v, new Object[] {v});
    s.put("float_1.1", new Object[] {1.1f});
    s.put("float_0.5", new Object[] {0.5f});
    s.put("float_max", new Object[] {Float.MAX_VALUE});
    s.put("char_x", new Object[] {'x'});
    s.put("str_empty", new Object[] {""});
    s.put("str_a", new Object[] {"a"});
    s.put("str_31", new Object[] {repeat("b", 31)});
    s.put("str_32", new Object[] {repeat("c", 32)});
    s.put("str_1023", new Object[] {repeat("d", 1023)});
    s.put("str_1024", new Object[] {repeat("e", 1024)});
    s.put("str_32768", new Object[] {repeat("f", 0x8000)});
    s.put("str_32769", new Object[] {repeat("g", 0x8001)});
    s.put("str_100000", new Object[] {repeat("h", 100000)});
    s.put("str_latin", new Object[] {"h\u00e9llo w\u00f6rld"});
    s.put("str_cjk", new Object[] {"\u4e2d\u6587\u5b57\u7b26"});
    s.put("str_emoji", new Object[] {"a\ud83d\ude00b"});
    s.put("str_mixed_40", new Object[] {repeat("\u00e9\u4e2d\ud83d\ude00x", 8)});
    s.put("str_lone_surrogate", new Object[] {"x\ud800y"});
    s.put("str_nul", new Object[] {"a\u0000b"});
    // A surrogate pair straddling the 0x8000 chunk boundary: Java ends the chunk early.
    s.put("str_pair_at_chunk", new Object[] {repeat("a", 0x7fff) + "\ud83d\ude00" + "tail"});
    s.put("str_long_cjk", new Object[] {repeat("\u4e2d", 40000)});
    s.put("bin_0", new Object[] {new byte[0]});
    s.put("bin_15", new Object[] {bytes(15)});
    s.put("bin_16", new Object[] {bytes(16)});
    s.put("bin_1023", new Object[] {bytes(1023)});
    s.put("bin_1024", new Object[] {bytes(1024)});
    s.put("bin_4000", new Object[] {bytes(4000)});
    s.put("bin_70000", new Object[] {bytes(70000)});
    s.put("date_0", new Object[] {new Date(0L)});
    s.put("date_minute", new Object[] {new Date(1600000020000L)});
    s.put("date_ms", new Object[] {new Date(1600000000123L)});
    s.put("date_negative", new Object[] {new Date(-86400000L * 365)});
    s.put("date_negative_ms", new Object[] {new Date(-1L)});
    s.put("list_empty", new Object[] {new ArrayList<>()});
    s.put("list_3", new Object[] {new ArrayList<>(Arrays.asList(1, "two", 3.5))});
    List<Object> l8 = new ArrayList<>();
    for (int i = 0; i < 8; i++) l8.add(i);
    s.put("list_8", new Object[] {l8});
    s.put("list_nested", new Object[] {new ArrayList<>(Arrays.asList(
        new ArrayList<>(Arrays.asList(1, 2)), new ArrayList<>(), null))});
    s.put("array_int", new Object[] {new int[] {1, 2, 3}});
    s.put("array_int_10", new Object[] {new int[] {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}});
    s.put("array_long", new Object[] {new long[] {1L, 2L}});
    s.put("array_double", new Object[] {new double[] {1.5, 2.0}});
    s.put("array_boolean", new Object[] {new boolean[] {true, false}});
    s.put("array_string", new Object[] {new String[] {"a", "b"}});
    s.put("array_object", new Object[] {new Object[] {1, "x", null}});
    s.put("array_integer", new Object[] {new Integer[] {1, 2}});
    s.put("two_int_arrays", new Object[] {new Object[] {new int[] {1}, new int[] {2}}});
    s.put("linkedlist", new Object[] {new LinkedList<>(Arrays.asList(1, 2))});
    s.put("hashset", new Object[] {new HashSet<>(Arrays.asList(1, 2, 3))});
    s.put("map_empty", new Object[] {new HashMap<>()});
    Map<Object, Object> m = new HashMap<>();
    m.put(1, "one");
    m.put(2, "two");
    s.put("map_int_keys", new Object[] {m});
    Map<String, Object> sm = new HashMap<>();
    sm.put("k", "v");
    s.put("map_str", new Object[] {sm});
    TreeMap<String, Object> tm = new TreeMap<>();
    tm.put("a", 1);
    tm.put("b", Arrays.asList(1, 2));
    s.put("treemap", new Object[] {tm});
    s.put("object", new Object[] {new Person("ann", 30, 7L)});
    Person full = new Person("bob", -1, 1L << 40);
    full.score = 2.5;
    full.active = true;
    full.tags = new ArrayList<>(Arrays.asList("x", "y"));
    full.extra = new HashMap<>();
    full.extra.put("k", 1);
    full.color = Color.GREEN;
    s.put("object_full", new Object[] {full});
    Person a = new Person("a", 1, 1L);
    Person b = new Person("b", 2, 2L);
    s.put("objects_two", new Object[] {new ArrayList<>(Arrays.asList(a, b))});
    s.put("object_shared", new Object[] {new ArrayList<>(Arrays.asList(a, a))});
    Person self = new Person("self", 0, 0L);
    self.friend = self;
    s.put("object_cycle", new Object[] {self});
    List<Object> selfList = new ArrayList<>();
    selfList.add(selfList);
    s.put("list_cycle", new Object[] {selfList});
    s.put("enum", new Object[] {Color.RED});
    s.put("enums_two", new Object[] {new ArrayList<>(Arrays.asList(Color.RED, Color.BLUE))});
    s.put("box_list", new Object[] {new Box(new ArrayList<>(Arrays.asList(1)))});
    List<Object> ks = new ArrayList<>(Arrays.asList(new K0(), new K1(), new K2(), new K3(),
        new K4(), new K5(), new K6(), new K7(), new K8(), new K9(), new K10(), new K11(),
        new K12(), new K13(), new K14(), new K15(), new K16(), new K16()));
    s.put("objects_17_classes", new Object[] {ks});
    Map<String, Object> att = new HashMap<>();
    att.put("path", "com.example.Svc");
    att.put("timeout", "3000");
    s.put("stream_dubbo_like", new Object[] {"2.0.2", "com.example.Svc", "1.0.0", "sayHello",
        "LHessianDriver$Person;LHessianDriver$Person;", a, b, att});
    s.put("stream_shared_ref", new Object[] {a, a, new int[] {5}});
    return s;
  }

  static final char[] HEX = "0123456789abcdef".toCharArray();

  static String hex(byte[] b) {
    char[] out = new char[b.length * 2];
    for (int i = 0; i < b.length; i++) {
      out[2 * i] = HEX[(b[i] >> 4) & 0xf];
      out[2 * i + 1] = HEX[b[i] & 0xf];
    }
    return new String(out);
  }

  static String units(String s) {
    char[] out = new char[s.length() * 4];
    for (int i = 0; i < s.length(); i++) {
      char c = s.charAt(i);
      for (int k = 0; k < 4; k++) out[4 * i + k] = HEX[(c >> (12 - 4 * k)) & 0xf];
    }
    return new String(out);
  }

  static byte[] unhex(String s) {
    byte[] b = new byte[s.length() / 2];
    for (int i = 0; i < b.length; i++) {
      b[i] = (byte) ((Character.digit(s.charAt(2 * i), 16) << 4) | Character.digit(s.charAt(2 * i + 1), 16));
    }
    return b;
  }

  static byte[] encode(Object[] values) throws Exception {
    ByteArrayOutputStream bos = new ByteArrayOutputStream();
    Hessian2Output out = new Hessian2Output(bos);
    out.setSerializerFactory(FACTORY);
    for (Object v : values) out.writeObject(v);
    out.flush();
    return bos.toByteArray();
  }

  // Canonical description. Map entries and set items are sorted; fields sorted by name; a
  // container met again on the current path is "@upN" (N levels up), so cycles terminate.
  static String describe(Object o, Deque<Object> path) {
    if (o == null) return "null";
    if (o instanceof Boolean) return o.toString();
    if (o instanceof Integer || o instanceof Short || o instanceof Byte) return "int:" + o;
    if (o instanceof Long) return "long:" + o;
    if (o instanceof Double) {
      return "double:" + String.format("%016x", Double.doubleToRawLongBits((Double) o));
    }
    if (o instanceof Float) {
      return "float:" + String.format("%08x", Float.floatToRawIntBits((Float) o));
    }
    if (o instanceof Character) return "char:" + String.format("%04x", (int) (Character) o);
    if (o instanceof String) return "str:" + units((String) o);
    if (o instanceof byte[]) return "bin:" + hex((byte[]) o);
    if (o instanceof Date) return "date:" + ((Date) o).getTime();
    if (o instanceof Enum) return "enum(" + o.getClass().getName() + ")" + ((Enum<?>) o).name();
    int up = 0;
    for (Object p : path) {
      up++;
      if (p == o) return "@up" + up;
    }
    path.push(o);
    try {
      Class<?> cl = o.getClass();
      if (cl.isArray()) {
        List<String> items = new ArrayList<>();
        for (int i = 0; i < Array.getLength(o); i++) items.add(describe(Array.get(o, i), path));
        return "array(" + cl.getComponentType().getName() + ")[" + String.join(",", items) + "]";
      }
      if (o instanceof Collection) {
        List<String> items = new ArrayList<>();
        for (Object x : (Collection<?>) o) items.add(describe(x, path));
        if (o instanceof Set) Collections.sort(items);
        return "list(" + cl.getName() + ")[" + String.join(",", items) + "]";
      }
      if (o instanceof Map) {
        List<String> items = new ArrayList<>();
        for (Map.Entry<?, ?> e : ((Map<?, ?>) o).entrySet()) {
          items.add(describe(e.getKey(), path) + "=" + describe(e.getValue(), path));
        }
        Collections.sort(items);
        return "map(" + cl.getName() + "){" + String.join(",", items) + "}";
      }
      TreeMap<String, String> fields = new TreeMap<>();
      for (Class<?> c = cl; c != null && c != Object.class; c = c.getSuperclass()) {
        for (Field f : c.getDeclaredFields()) {
          int mod = f.getModifiers();
          if (Modifier.isStatic(mod) || Modifier.isTransient(mod)) continue;
          f.setAccessible(true);
          fields.put(f.getName(), describe(f.get(o), path));
        }
      }
      List<String> items = new ArrayList<>();
      for (Map.Entry<String, String> e : fields.entrySet()) {
        items.add(e.getKey() + "=" + e.getValue());
      }
      return "obj(" + cl.getName() + "){" + String.join(",", items) + "}";
    } catch (IllegalAccessException e) {
      throw new RuntimeException(e);
    } finally {
      path.pop();
    }
  }

  public static void main(String[] args) throws Exception {
    PrintStream out = new PrintStream(System.out, false, "UTF-8");
    if (args.length == 1 && args[0].equals("encode")) {
      for (Map.Entry<String, Object[]> e : samples().entrySet()) {
        out.println(e.getKey() + "\t" + hex(encode(e.getValue())));
      }
    } else if (args.length == 1 && args[0].equals("decode")) {
      BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
      String line;
      while ((line = in.readLine()) != null) {
        if (line.isEmpty()) continue;
        String[] parts = line.split("\t", -1);
        String name = parts[0];
        try {
          int count = Integer.parseInt(parts[1]);
          byte[] data = unhex(parts[2]);
          ByteArrayInputStream bis = new ByteArrayInputStream(data);
          Hessian2Input hin = new Hessian2Input(bis);
          hin.setSerializerFactory(FACTORY);
          Object[] values = new Object[count];
          List<String> descs = new ArrayList<>();
          for (int i = 0; i < count; i++) {
            values[i] = hin.readObject();
            descs.add(describe(values[i], new ArrayDeque<>()));
          }
          out.println(name + "\tOK\t" + String.join("|", descs) + "\t" + hex(encode(values)));
        } catch (Throwable t) {
          out.println(name + "\tERR\t" + t.toString().replace('\t', ' ').replace('\n', ' '));
        }
      }
    } else {
      System.err.println("usage: HessianDriver encode|decode");
      System.exit(2);
    }
    out.flush();
  }
}
