// pgjdbc (Debian's libpostgresql-jdbc-java) at its default prepareThreshold
// and with prepareThreshold=1: batches, setFetchSize cursors, temp tables,
// tables created and dropped mid-session, search_path changes and DDL that
// invalidates cached plans: the driver matrix workload (see drivers.rs).
// java -cp /usr/share/java/postgresql.jar Jdbc.java HOST PORT USER DB CONNECTIONS ITERATIONS
// Prints one JSON-ish object: per-connection results and the errors seen.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class Jdbc {
    static final Map<String, List<String>> results = new ConcurrentSkipListMap<>();
    static final List<String> errors = Collections.synchronizedList(new ArrayList<>());

    static String rows(ResultSet rs) throws SQLException {
        StringBuilder b = new StringBuilder("[");
        int cols = rs.getMetaData().getColumnCount();
        while (rs.next()) {
            b.append("(");
            for (int i = 1; i <= cols; i++) b.append(i > 1 ? "," : "").append(rs.getString(i));
            b.append(")");
        }
        return b.append("]").toString();
    }

    static void one(String url, String label, int c, int k) {
        List<String> out = new ArrayList<>();
        try (Connection conn = DriverManager.getConnection(url)) {
            try (Statement st = conn.createStatement()) {
                st.execute("SET search_path = s" + c + ", public");
            }
            for (int i = 0; i < k; i++) {
                try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int * 2")) {
                    ps.setInt(1, i);
                    out.add(rows(ps.executeQuery()));
                }
                conn.setAutoCommit(false);
                try (Statement st = conn.createStatement()) {
                    st.execute("CREATE TEMP TABLE t_commit(a int) ON COMMIT DROP");
                }
                try (PreparedStatement ps = conn.prepareStatement("INSERT INTO t_commit VALUES (?)")) {
                    for (int j = 0; j <= i; j++) { ps.setInt(1, j); ps.addBatch(); }
                    out.add(Arrays.toString(ps.executeBatch()));
                }
                try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM t_commit WHERE a >= ?")) {
                    ps.setInt(1, 0);
                    out.add(rows(ps.executeQuery()));
                }
                try (PreparedStatement ps = conn.prepareStatement("SELECT g FROM generate_series(1, ?) g")) {
                    ps.setFetchSize(5);
                    ps.setInt(1, 20 + i);
                    out.add(rows(ps.executeQuery()));
                }
                conn.commit();
                try (Statement st = conn.createStatement()) {
                    st.execute("CREATE TEMP TABLE t_del(a int) ON COMMIT DELETE ROWS");
                    st.execute("INSERT INTO t_del SELECT generate_series(1, " + (i + 1) + ")");
                    out.add(rows(st.executeQuery("SELECT sum(a) FROM t_del")));
                }
                conn.commit();
                conn.setAutoCommit(true);
                try (Statement st = conn.createStatement()) {
                    out.add(rows(st.executeQuery("SELECT count(*) FROM t_del")));
                    st.execute("DROP TABLE t_del");
                    st.execute("CREATE TABLE mid(a int, b text)");
                }
                try (PreparedStatement ps = conn.prepareStatement("INSERT INTO mid VALUES (?, ?)")) {
                    ps.setInt(1, i); ps.setString(2, "m" + i); ps.executeUpdate();
                }
                try (PreparedStatement ps = conn.prepareStatement("SELECT a, b FROM mid")) {
                    out.add(rows(ps.executeQuery()));
                }
                try (Statement st = conn.createStatement()) {
                    st.execute("DROP TABLE mid");
                    st.execute("ALTER TABLE items ADD COLUMN " + label + i + " int DEFAULT " + i);
                }
                try (PreparedStatement ps = conn.prepareStatement("SELECT id, v FROM items WHERE id >= ? ORDER BY id")) {
                    ps.setInt(1, 0);
                    out.add(rows(ps.executeQuery()));
                }
                try (Statement st = conn.createStatement()) {
                    st.execute("SET search_path = public");
                    out.add(rows(st.executeQuery("SELECT current_schemas(false)::text")));
                    st.execute("SET search_path = s" + c + ", public");
                }
            }
        } catch (Exception e) {
            errors.add(label + c + ": " + e);
        }
        results.put(label + c, out);
    }

    public static void main(String[] a) throws Exception {
        String host = a[0], port = a[1], user = a[2], db = a[3];
        int n = Integer.parseInt(a[4]), k = Integer.parseInt(a[5]);
        String base = "jdbc:postgresql://" + host + ":" + port + "/" + db + "?user=" + user + "&sslmode=disable";
        for (String[] mode : new String[][] {{"jdefault", ""}, {"jthreshold1", "&prepareThreshold=1"}}) {
            ExecutorService pool = Executors.newFixedThreadPool(n);
            for (int c = 0; c < n; c++) {
                final int cc = c;
                pool.submit(() -> one(base + mode[1], mode[0], cc, k));
            }
            pool.shutdown();
            pool.awaitTermination(10, TimeUnit.MINUTES);
        }
        StringBuilder b = new StringBuilder("{\"results\": {");
        boolean first = true;
        for (Map.Entry<String, List<String>> e : results.entrySet()) {
            b.append(first ? "" : ", ").append('"').append(e.getKey()).append("\": [");
            for (int i = 0; i < e.getValue().size(); i++)
                b.append(i > 0 ? ", " : "").append('"').append(e.getValue().get(i).replace("\"", "'")).append('"');
            b.append("]");
            first = false;
        }
        b.append("}, \"errors\": [");
        for (int i = 0; i < errors.size(); i++)
            b.append(i > 0 ? ", " : "").append('"').append(errors.get(i).replace("\"", "'").replace("\n", " ")).append('"');
        System.out.println(b.append("]}"));
    }
}
